//! The attention kernels generated in Rust for adapters whose subgroups are exactly
//! [`SUBGROUP_LANES`] wide (lavapipe): forward, dQ and dK/dV, fully unrolled for one
//! [`SubgroupShape`], appended to their module under `shaders/attention/` (its bindings and the
//! common header's helpers).

use super::{SubgroupShape, ROWS, SUBGROUP_LANES};

macro_rules! w {
    ($s:expr, $($t:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($s, $($t)*);
    }};
}

/// `f(a, f(b, ...))` over `items` (one item: itself).
fn fold(f: &str, items: &[String]) -> String {
    let mut out = items[0].clone();
    for x in &items[1..] {
        out = format!("{f}({out}, {x})");
    }
    out
}

/// One product of the score phase: `acc{r}_{k} += held row r · streamed row k` over the head
/// dimension, for every row r of the workgroup and every streamed row k of this lane.
struct Product<'a> {
    acc: &'a str,
    /// WGSL load of chunk `c` of held row `r`.
    held: &'a dyn Fn(u32, &str) -> String,
    /// WGSL load of chunk `c` of this lane's streamed row `k`.
    streamed: &'a dyn Fn(u32, &str) -> String,
}

/// The score phase. Each lane loads its own chunks (lane + 8s) of the held rows and, per chunk
/// 8s + l, every lane loads that chunk of its own streamed rows while the held chunk comes from
/// lane l by broadcast: every value is loaded once per subgroup and used for rows × per_lane
/// dot products.
fn emit_scores(w: &mut String, sh: &SubgroupShape, products: &[Product]) {
    let rows = sh.rows();
    for pr in products {
        for r in 0..rows {
            for k in 0..sh.per_lane {
                w!(w, "        var {}{r}_{k} = 0.0;", pr.acc);
            }
        }
    }
    w!(w, "        for (var s = 0u; s < {}u; s++) {{", sh.slots);
    w!(w, "            let own = min(lane + 8u * s, d4 - 1u);");
    w!(w, "            let live = lane + 8u * s < d4;");
    for (pi, pr) in products.iter().enumerate() {
        for r in 0..rows {
            w!(
                w,
                "            let hv{pi}_{r} = select(vec4<f32>(0.0), {}, live);",
                (pr.held)(r, "own")
            );
        }
    }
    for l in 0..SUBGROUP_LANES {
        w!(w, "            {{");
        w!(w, "                let c = min(8u * s + {l}u, d4 - 1u);");
        for (pi, pr) in products.iter().enumerate() {
            for k in 0..sh.per_lane {
                w!(
                    w,
                    "                let x{pi}_{k} = {};",
                    (pr.streamed)(k, "c")
                );
            }
        }
        for (pi, pr) in products.iter().enumerate() {
            for r in 0..rows {
                w!(
                    w,
                    "                let y{pi}_{r} = subgroupBroadcast(hv{pi}_{r}, {l}u);"
                );
                for k in 0..sh.per_lane {
                    w!(
                        w,
                        "                {a}{r}_{k} += dot(y{pi}_{r}, x{pi}_{k});",
                        a = pr.acc
                    );
                }
            }
        }
        w!(w, "            }}");
    }
    w!(w, "        }}");
}

/// One term of the accumulation phase: `target{r}_{s} += weight{r}_{k} · streamed row`, chunk
/// lane + 8s, for every streamed row of the block.
struct Term<'a> {
    weight: &'a str,
    target: &'a str,
    /// WGSL load of chunk `c` of the streamed row at token `t`.
    load: &'a dyn Fn(&str, &str) -> String,
}

/// The accumulation phase: streamed row 8k + j of the block (owned by lane j, whose weights
/// reach every lane by broadcast); each lane loads its own chunks of it.
fn emit_accumulate(w: &mut String, sh: &SubgroupShape, base: &str, terms: &[Term]) {
    let rows = sh.rows();
    for k in 0..sh.per_lane {
        for j in 0..SUBGROUP_LANES {
            w!(w, "        {{");
            w!(
                w,
                "            let tv = min({base} + {}u, last);",
                j + SUBGROUP_LANES * k
            );
            for (ti, t) in terms.iter().enumerate() {
                for r in 0..rows {
                    w!(
                        w,
                        "            let w{ti}_{r} = vec4<f32>(subgroupBroadcast({}{r}_{k}, {j}u));",
                        t.weight
                    );
                }
            }
            for s in 0..sh.slots {
                w!(w, "            {{");
                w!(
                    w,
                    "                let c = min(lane + {}u, d4 - 1u);",
                    8 * s
                );
                for (ti, t) in terms.iter().enumerate() {
                    w!(w, "                let v{ti} = {};", (t.load)("tv", "c"));
                    for r in 0..rows {
                        w!(
                            w,
                            "                {g}{r}_{s} = fma(w{ti}_{r}, v{ti}, {g}{r}_{s});",
                            g = t.target
                        );
                    }
                }
                w!(w, "            }}");
            }
            w!(w, "        }}");
        }
    }
}

/// `lo`, `hi`: the union of the visibility ranges of the workgroup's mask blocks `blk0 ..`
/// (`which`: "q" for the key ranges of query blocks, "k" for the query ranges of key blocks).
fn emit_range_union(w: &mut String, sh: &SubgroupShape, which: &str) {
    w!(w, "    var lo = p.seq;\n    var hi = 0u;");
    for x in 0..sh.blocks {
        w!(w, "    {{");
        w!(w, "        let at = p.{which}_ranges_off + (b * p.{which}_blocks + min(blk0 + {x}u, p.{which}_blocks - 1u)) * 2u;");
        w!(
            w,
            "        let r_lo = u32(MASK[at]);\n        let r_hi = u32(MASK[at + 1u]);"
        );
        // an empty range must not widen the union
        w!(
            w,
            "        if (r_lo < r_hi) {{ lo = min(lo, r_lo); hi = max(hi, r_hi); }}"
        );
        w!(w, "    }}");
    }
}

/// Forward and dQ: the workgroup's query rows r = g · nq + i (head h0 + g, token t{i}), their
/// visible key range [lo, hi), and this lane's keys of a block at k0.
fn emit_query_rows_prologue(w: &mut String, sh: &SubgroupShape) {
    let nq = sh.blocks * ROWS as u32;
    w!(w, "    let b = wg.z;");
    w!(w, "    let h0 = wg.y * {}u;", sh.heads);
    w!(w, "    let kvh = h0 / (p.q_heads / p.kv_heads);");
    w!(w, "    let d4 = p.head_dim / 4u;");
    w!(w, "    let last = p.seq - 1u;");
    w!(w, "    let blk0 = wg.x * {}u;", sh.blocks);
    emit_range_union(w, sh, "q");
    for i in 0..nq {
        w!(w, "    let t{i} = blk0 * {}u + {i}u;", ROWS);
        w!(w, "    let tc{i} = min(t{i}, last);");
        w!(w, "    let qi{i} = token_info(b, t{i});");
    }
}

fn emit_key_block_start(w: &mut String, sh: &SubgroupShape) {
    w!(
        w,
        "    for (var k0 = lo; k0 < hi; k0 += {}u) {{",
        SUBGROUP_LANES * sh.per_lane
    );
    for k in 0..sh.per_lane {
        w!(
            w,
            "        let key{k} = k0 + lane + {}u;",
            SUBGROUP_LANES * k
        );
        w!(w, "        let kc{k} = min(key{k}, last);");
        w!(w, "        let ki{k} = token_info(b, key{k});");
    }
}

/// The forward entry point `attention_sg_forward` (a flash-attention forward). A workgroup
/// (one subgroup of 8 lanes) owns `rows` query rows; lane l holds the output accumulators of
/// chunks l + 8s of every row. Keys stream in blocks of 8 · per_lane, lane j owning keys
/// k0 + j + 8k: the scores S = Q·Kᵀ of its keys come from [`emit_scores`], the online softmax
/// runs per lane on its keys (row max by subgroupMax, the row sum kept as per-lane partials
/// until the end), and O += P·V by [`emit_accumulate`]. Everything is unrolled into named
/// variables: llvmpipe turns dynamically indexed private arrays into per-lane gathers.
pub(super) fn subgroup_forward(sh: &SubgroupShape) -> String {
    let rows = sh.rows();
    let nq = sh.blocks * ROWS as u32;
    let mut s = String::new();
    let w = &mut s;
    w!(w, "\n@compute @workgroup_size(8, 1, 1)");
    w!(w, "fn attention_sg_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {{");
    emit_query_rows_prologue(w, sh);
    for r in 0..rows {
        w!(w, "    var m{r} = NEG;\n    var l{r} = 0.0;");
        for s in 0..sh.slots {
            w!(w, "    var a{r}_{s} = vec4<f32>(0.0);");
        }
    }
    emit_key_block_start(w, sh);
    let held = |r: u32, c: &str| format!("ld_q(q_index(b, tc{}, h0 + {}u, {c}))", r % nq, r / nq);
    let streamed = |k: u32, c: &str| format!("ld_k(kv_index(b, kc{k}, kvh, {c}))");
    emit_scores(
        w,
        sh,
        &[Product {
            acc: "s",
            held: &held,
            streamed: &streamed,
        }],
    );
    for r in 0..rows {
        let i = r % nq;
        let mut scores = vec![];
        for k in 0..sh.per_lane {
            w!(w, "        s{r}_{k} = select(NEG, s{r}_{k} * p.scale, allowed(qi{i}, ki{k}, t{i}, key{k}));");
            scores.push(format!("s{r}_{k}"));
        }
        w!(
            w,
            "        let mn{r} = max(m{r}, subgroupMax({}));",
            fold("max", &scores)
        );
        w!(
            w,
            "        let al{r} = exp(m{r} - mn{r});\n        m{r} = mn{r};"
        );
        let mut probs = vec![];
        for k in 0..sh.per_lane {
            w!(
                w,
                "        let p{r}_{k} = select(0.0, exp(s{r}_{k} - mn{r}), s{r}_{k} > 0.5 * NEG);"
            );
            probs.push(format!("p{r}_{k}"));
        }
        w!(w, "        l{r} = l{r} * al{r} + {};", probs.join(" + "));
        for s in 0..sh.slots {
            w!(w, "        a{r}_{s} = a{r}_{s} * al{r};");
        }
    }
    let load_v = |t: &str, c: &str| format!("ld_v(kv_index(b, {t}, kvh, {c}))");
    emit_accumulate(
        w,
        sh,
        "k0",
        &[Term {
            weight: "p",
            target: "a",
            load: &load_v,
        }],
    );
    w!(w, "    }}");
    for r in 0..rows {
        let (g, i) = (r / nq, r % nq);
        w!(w, "    {{");
        w!(w, "        let lt = subgroupAdd(l{r});");
        w!(w, "        if (t{i} < p.seq) {{");
        w!(w, "            let inv = select(0.0, 1.0 / lt, lt > 0.0);");
        for s in 0..sh.slots {
            w!(w, "            if (lane + {}u < d4) {{ O[q_index(b, t{i}, h0 + {g}u, lane + {}u)] = a{r}_{s} * inv; }}", 8 * s, 8 * s);
        }
        w!(w, "            if (lane == 0u) {{ LSE[(b * p.q_heads + h0 + {g}u) * p.seq + t{i}] = select(pos_inf(), m{r} + log(lt), lt > 0.0); }}");
        w!(w, "        }}");
        w!(w, "    }}");
    }
    w!(w, "}}");
    s
}

/// The dQ entry point `attention_sg_dq`: the forward's layout; per key block S = Q·Kᵀ and
/// dP = dO·Vᵀ for this lane's keys, dS = P ⊙ (dP − delta), then dQ += dS·K.
pub(super) fn subgroup_dq(sh: &SubgroupShape) -> String {
    let rows = sh.rows();
    let nq = sh.blocks * ROWS as u32;
    let mut s = String::new();
    let w = &mut s;
    w!(w, "\n@compute @workgroup_size(8, 1, 1)");
    w!(w, "fn attention_sg_dq(@builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {{");
    emit_query_rows_prologue(w, sh);
    for r in 0..rows {
        let (g, i) = (r / nq, r % nq);
        w!(
            w,
            "    let st{r} = STATS[(b * p.q_heads + h0 + {g}u) * p.seq + tc{i}];"
        );
        for s in 0..sh.slots {
            w!(w, "    var a{r}_{s} = vec4<f32>(0.0);");
        }
    }
    emit_key_block_start(w, sh);
    let q = |r: u32, c: &str| format!("ld_q(q_index(b, tc{}, h0 + {}u, {c}))", r % nq, r / nq);
    let d_o = |r: u32, c: &str| format!("ld_do(q_index(b, tc{}, h0 + {}u, {c}))", r % nq, r / nq);
    let k = |k: u32, c: &str| format!("ld_k(kv_index(b, kc{k}, kvh, {c}))");
    let v = |k: u32, c: &str| format!("ld_v(kv_index(b, kc{k}, kvh, {c}))");
    emit_scores(
        w,
        sh,
        &[
            Product {
                acc: "s",
                held: &q,
                streamed: &k,
            },
            Product {
                acc: "dp",
                held: &d_o,
                streamed: &v,
            },
        ],
    );
    for r in 0..rows {
        let i = r % nq;
        for k in 0..sh.per_lane {
            w!(w, "        let p{r}_{k} = select(0.0, exp(s{r}_{k} * p.scale - st{r}.x), allowed(qi{i}, ki{k}, t{i}, key{k}));");
            w!(
                w,
                "        let g{r}_{k} = p{r}_{k} * (dp{r}_{k} - st{r}.y);"
            );
        }
    }
    let load_k = |t: &str, c: &str| format!("ld_k(kv_index(b, {t}, kvh, {c}))");
    emit_accumulate(
        w,
        sh,
        "k0",
        &[Term {
            weight: "g",
            target: "a",
            load: &load_k,
        }],
    );
    w!(w, "    }}");
    for r in 0..rows {
        let (g, i) = (r / nq, r % nq);
        w!(w, "    if (t{i} < p.seq) {{");
        for s in 0..sh.slots {
            w!(w, "        if (lane + {}u < d4) {{ DQ[q_index(b, t{i}, h0 + {g}u, lane + {}u)] = a{r}_{s} * p.scale; }}", 8 * s, 8 * s);
        }
        w!(w, "    }}");
    }
    w!(w, "}}");
    s
}

/// The dK/dV entry point `attention_sg_dkdv`: a workgroup owns `rows` key rows of one kv head
/// (lane l holding chunks l + 8s of their dK, dV) and streams, for every q head of the kv head,
/// the queries that can see them, lane j owning queries i0 + j + 8k: Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ,
/// dSᵀ = Pᵀ ⊙ (dPᵀ − delta), then dV += Pᵀ·dO and dK += dSᵀ·Q. No atomics: each key row has
/// one owner.
pub(super) fn subgroup_dkdv(sh: &SubgroupShape) -> String {
    let rows = sh.rows();
    let mut s = String::new();
    let w = &mut s;
    w!(w, "\n@compute @workgroup_size(8, 1, 1)");
    w!(w, "fn attention_sg_dkdv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {{");
    w!(
        w,
        "    let b = wg.z;\n    let kvh = wg.y;\n    let group = p.q_heads / p.kv_heads;"
    );
    w!(
        w,
        "    let d4 = p.head_dim / 4u;\n    let last = p.seq - 1u;"
    );
    w!(w, "    let blk0 = wg.x * {}u;", sh.blocks);
    emit_range_union(w, sh, "k");
    for r in 0..rows {
        w!(w, "    let t{r} = blk0 * {}u + {r}u;", ROWS);
        w!(w, "    let tc{r} = min(t{r}, last);");
        w!(w, "    let ki{r} = token_info(b, t{r});");
        for s in 0..sh.slots {
            w!(
                w,
                "    var dk{r}_{s} = vec4<f32>(0.0);\n    var dv{r}_{s} = vec4<f32>(0.0);"
            );
        }
    }
    w!(
        w,
        "    for (var h = kvh * group; h < kvh * group + group; h++) {{"
    );
    w!(
        w,
        "    for (var i0 = lo; i0 < hi; i0 += {}u) {{",
        SUBGROUP_LANES * sh.per_lane
    );
    for k in 0..sh.per_lane {
        w!(
            w,
            "        let qn{k} = i0 + lane + {}u;",
            SUBGROUP_LANES * k
        );
        w!(w, "        let qc{k} = min(qn{k}, last);");
        w!(w, "        let qi{k} = token_info(b, qn{k});");
        w!(
            w,
            "        let st{k} = STATS[(b * p.q_heads + h) * p.seq + qc{k}];"
        );
    }
    let k_row = |r: u32, c: &str| format!("ld_k(kv_index(b, tc{r}, kvh, {c}))");
    let v_row = |r: u32, c: &str| format!("ld_v(kv_index(b, tc{r}, kvh, {c}))");
    let q = |k: u32, c: &str| format!("ld_q(q_index(b, qc{k}, h, {c}))");
    let d_o = |k: u32, c: &str| format!("ld_do(q_index(b, qc{k}, h, {c}))");
    emit_scores(
        w,
        sh,
        &[
            Product {
                acc: "s",
                held: &k_row,
                streamed: &q,
            },
            Product {
                acc: "dp",
                held: &v_row,
                streamed: &d_o,
            },
        ],
    );
    for r in 0..rows {
        for k in 0..sh.per_lane {
            w!(w, "        let p{r}_{k} = select(0.0, exp(s{r}_{k} * p.scale - st{k}.x), allowed(qi{k}, ki{r}, qn{k}, t{r}));");
            w!(
                w,
                "        let g{r}_{k} = p{r}_{k} * (dp{r}_{k} - st{k}.y);"
            );
        }
    }
    let load_do = |t: &str, c: &str| format!("ld_do(q_index(b, {t}, h, {c}))");
    let load_q = |t: &str, c: &str| format!("ld_q(q_index(b, {t}, h, {c}))");
    emit_accumulate(
        w,
        sh,
        "i0",
        &[
            Term {
                weight: "p",
                target: "dv",
                load: &load_do,
            },
            Term {
                weight: "g",
                target: "dk",
                load: &load_q,
            },
        ],
    );
    w!(w, "    }}\n    }}");
    for r in 0..rows {
        w!(w, "    if (t{r} < p.seq) {{");
        for s in 0..sh.slots {
            w!(w, "        if (lane + {}u < d4) {{", 8 * s);
            w!(
                w,
                "            DK[kv_index(b, t{r}, kvh, lane + {}u)] = dk{r}_{s} * p.scale;",
                8 * s
            );
            w!(
                w,
                "            DV[kv_index(b, t{r}, kvh, lane + {}u)] = dv{r}_{s};",
                8 * s
            );
            w!(w, "        }}");
        }
        w!(w, "    }}");
    }
    w!(w, "}}");
    s
}
