//! The matmul kernels generated in Rust: the fully unrolled register kernel and the subgroup
//! kernel, appended to `shaders/matmul.wgsl`'s module (they use its operand loads, `Params` and
//! `store`), and the tile shapes they are generated for.

use std::sync::OnceLock;

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
pub(super) fn subgroup_tile() -> (u32, u32) {
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
pub(super) fn subgroup_k_inner() -> bool {
    static K: OnceLock<bool> = OnceLock::new();
    *K.get_or_init(|| std::env::var("RUNNER_MATMUL_SG_KINNER").map_or(true, |v| v != "0"))
}
/// WGSL of `matmul_subgroup`, the kernel for CPU adapters that run a subgroup of `lanes`
/// invocations as one SIMD vector (lavapipe: 8 lanes with 256-bit vectors, 4 or 16 with
/// LP_NATIVE_VECTOR_WIDTH=128/512). There a storage load costs a loop over the lanes, so loads
/// are what to save: each lane loads only its own TN columns of op(B) and 1/lanes of the TM rows
/// of op(A), and the A values reach the other lanes by `subgroupBroadcast` (a register
/// shuffle). Per 4 steps of K a lane issues TM/lanes + TN vec4 loads for 4·TM·TN FMAs (the plain
/// register kernel: TM + TN loads for 4·TM·TN). Fully unrolled with one variable per
/// accumulator, like [`unrolled_register_kernel`]. Its workgroup is exactly one subgroup.
///
/// Lane `l` owns columns `n0 + 4l + 4·lanes·j + c` (j < TN/4, c < 4). Without TRANS_A it loads
/// rows `m0 + l + lanes·q` (4 consecutive k); with TRANS_A rows `m0 + 4·lanes·q + 4l + c` (one
/// k per load).
pub(crate) fn subgroup_kernel(
    lanes: u32,
    tm: u32,
    tn: u32,
    trans_a: bool,
    trans_b: bool,
    k_inner: bool,
) -> String {
    use std::fmt::Write as _;
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
    let col = |j: u32| format!("n0 + lane * 4u + {}u", 4 * lanes * (j / 4) + j % 4);
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
                    4 * lanes * q
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
    // K not a multiple of 4: one k per step, op(A) rows m0 + l + lanes·q loaded by lane l.
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

/// A cooperative-matrix configuration the coop kernel is generated for: `size`×`size` tiles
/// with f32 accumulators, A and B in f16 (`f16`) or f32. wgpu 30 reaches 8×8 (f32) and 16×16
/// matrices: `coop_mat8x8` / `coop_mat16x16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CoopConfig {
    pub size: u32,
    pub f16: bool,
}

impl std::fmt::Display for CoopConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ab = if self.f16 { "f16" } else { "f32" };
        write!(f, "{0}x{0} {ab}/f32", self.size)
    }
}

/// Tiles of a coop workgroup's block: COOP_TILES × COOP_TILES matrices of C.
pub(super) const COOP_TILES: u32 = 2;

/// WGSL of `matmul_coop` for `cfg`, with a workgroup of `lanes` invocations (one subgroup: the
/// cooperative operations are subgroup-wide). A workgroup owns a (2·size)×(2·size) block of C:
/// each size-deep slice of op(A) and op(B) is read through the module's bounds-checked a1/b1
/// (transposes, NF4 and bf16 B included; zeros past the edges), converted to the operand type
/// and staged in workgroup memory, from where `coopLoadT` takes the A and B matrices; the four
/// accumulators go back through workgroup memory to the module's `store` epilogue (alpha,
/// beta, bias, the edges). Appended to the matmul module with its `COOP` feature (and `F16`
/// for f16 operands). Only ever selected where a run on that adapter has checked it against
/// the reference ([`crate::gpu::Gpu::verify_coop_matmul`]): lavapipe has no cooperative
/// matrices.
pub(crate) fn coop_kernel(cfg: CoopConfig, lanes: u32) -> String {
    use std::fmt::Write;
    let s = cfg.size;
    let (bm, bn) = (COOP_TILES * s, COOP_TILES * s);
    let ab = if cfg.f16 { "f16" } else { "f32" };
    let mat = |role: &str| format!("coop_mat{s}x{s}<{ab}, {role}>");
    let acc_ty = format!("coop_mat{s}x{s}<f32, C>");
    let mut w = String::new();
    let tiles: Vec<(u32, u32)> = (0..COOP_TILES)
        .flat_map(|i| (0..COOP_TILES).map(move |j| (i, j)))
        .collect();
    let _ = writeln!(
        w,
        r#"
// ---- matmul_coop: cooperative matrices ({cfg}), generated (kernels/matmul/codegen.rs)
var<workgroup> coop_a: array<{ab}, {a_len}>; // [m][k] of the block, row-major
var<workgroup> coop_b: array<{ab}, {b_len}>; // [k][n], row-major
var<workgroup> coop_c: array<f32, {c_len}>;  // [m][n], row-major

@compute @workgroup_size({lanes}, 1, 1)
fn matmul_coop(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) l: u32) {{
    let m0 = wid.y * {bm}u;
    let n0 = wid.x * {bn}u;
    let a_base = p.a_off + wid.z * p.a_batch;
    let b_base = p.b_off + wid.z * p.b_batch;
    let c_base = p.c_off + wid.z * p.c_batch;
    for (var e = l; e < {c_len}u; e += {lanes}u) {{ coop_c[e] = 0.0; }}
    workgroupBarrier();"#,
        a_len = bm * s,
        b_len = s * bn,
        c_len = bm * bn,
    );
    for &(i, j) in &tiles {
        let _ = writeln!(
            w,
            "    var acc_{i}_{j} = coopLoadT<{acc_ty}>(&coop_c[{}u], {bn}u);",
            i * s * bn + j * s
        );
    }
    let _ = writeln!(
        w,
        r#"    for (var k0 = 0u; k0 < p.k; k0 += {s}u) {{
        for (var e = l; e < {a_len}u; e += {lanes}u) {{
            let m = m0 + e / {s}u;
            let k = k0 + e % {s}u;
            var v = 0.0;
            if (m < p.m && k < p.k) {{ v = a1(a_base + a_index(m, k)); }}
            coop_a[e] = {ab}(v);
        }}
        for (var e = l; e < {b_len}u; e += {lanes}u) {{
            let k = k0 + e / {bn}u;
            let n = n0 + e % {bn}u;
            var v = 0.0;
            if (n < p.n && k < p.k) {{ v = b1(b_base + b_index(k, n)); }}
            coop_b[e] = {ab}(v);
        }}
        workgroupBarrier();"#,
        a_len = bm * s,
        b_len = s * bn,
    );
    for i in 0..COOP_TILES {
        let _ = writeln!(
            w,
            "        let a_{i} = coopLoadT<{}>(&coop_a[{}u], {s}u);",
            mat("A"),
            i * s * s
        );
    }
    for j in 0..COOP_TILES {
        let _ = writeln!(
            w,
            "        let b_{j} = coopLoadT<{}>(&coop_b[{}u], {bn}u);",
            mat("B"),
            j * s
        );
    }
    for &(i, j) in &tiles {
        let _ = writeln!(
            w,
            "        acc_{i}_{j} = coopMultiplyAdd(a_{i}, b_{j}, acc_{i}_{j});"
        );
    }
    let _ = writeln!(w, "        workgroupBarrier();\n    }}");
    for &(i, j) in &tiles {
        let _ = writeln!(
            w,
            "    coopStoreT(acc_{i}_{j}, &coop_c[{}u], {bn}u);",
            i * s * bn + j * s
        );
    }
    let _ = writeln!(
        w,
        r#"    workgroupBarrier();
    for (var e = l; e < {c_len}u; e += {lanes}u) {{
        let m = m0 + e / {bn}u;
        let n = n0 + e % {bn}u;
        if (m < p.m && n < p.n) {{ store(m, n, c_base, coop_c[e]); }}
    }}
}}"#,
        c_len = bm * bn,
    );
    w
}
