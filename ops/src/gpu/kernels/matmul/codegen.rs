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
/// Lanes of the subgroup kernel (its workgroup is exactly one subgroup of this size).
pub(super) const SUBGROUP_LANES: u32 = 8;

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
