// Flash-style attention (online softmax; never a seq×seq matrix), forward and backward.
// Reference: ops/src/reference/attention.rs (layouts, mask rule, fully-masked rows).
//
// Layout: Q, O, dO, dQ are [batch, seq, q_heads, head_dim]; K, V, dK, dV [batch, seq, kv_heads,
// head_dim]; all bound as vec4 (head_dim is a multiple of 4). LSE is [batch, q_heads, seq];
// STATS (backward) is [batch, q_heads, seq] of (lse, delta = dO·O).
//
// Work split: a workgroup is LANES = 8 invocations that form one subgroup. It owns ROWS query
// rows (forward, dQ) or ROWS key rows (dK/dV) of one head; each lane holds a slice of the head
// dimension — vec4 chunk c = lane + 8·slot for slot < SLOTS — of every row it owns, so every
// value loaded from memory is used by exactly one lane and the private arrays are indexed only
// by unrolled constant loops (llvmpipe loads storage one lane at a time and turns dynamic private
// indexing into gathers). A dot product over the head dimension is a per-lane partial sum
// finished with subgroupAdd.
//
// The file holds one module per kernel: the common header, then each `//== kernel <name>`
// section (its bindings and entry point), assembled by ops/src/gpu/kernels/attention.rs.
//
// MASK buffer (i32): [0, batch*seq): per token (group + 1) * 2 + valid, where group is the image
// group (-1 for text) and valid the attention_mask bit; then at q_ranges_off, per (batch, query
// block) the key range [lo, hi) that can hold visible keys; at k_ranges_off, per (batch, key
// block) the query range [lo, hi) that can see them. Ranges only skip work: the exact rule is
// `allowed` below, evaluated per (query, key).

struct Params {
    batch: u32, seq: u32, q_heads: u32, kv_heads: u32,
    head_dim: u32, causal: u32, window: u32, scale: f32,
    q_blocks: u32, k_blocks: u32, q_ranges_off: u32, k_ranges_off: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

const LANES: u32 = 8u;
const MAX_SLOTS: u32 = 8u;   // head_dim <= LANES * MAX_SLOTS * 4 = 256
const MAX_ROWS: u32 = 16u;
const KB: u32 = 8u;          // keys (forward, dQ) or queries (dK/dV) streamed per block
// A finite "minus infinity" so that exp(NEG - NEG) never produces NaN.
const NEG: f32 = -1.0e30;

override SLOTS: u32 = 8u;    // ceil(head_dim / 32)
override ROWS: u32 = 8u;     // rows owned per workgroup, <= MAX_ROWS

// Token info (see MASK above) of token t of sample b; 0 (= padding, never visible) past the end.
fn token_info(b: u32, t: u32) -> i32 {
    if (t >= p.seq) { return 0; }
    return MASK[b * p.seq + t];
}

// Whether query q (info iq) may see key kv (info ik) — the reference's AttentionMask::allows.
fn allowed(iq: i32, ik: i32, q: u32, kv: u32) -> bool {
    if (q >= p.seq || (ik & 1) == 0) { return false; }
    var positional = true;
    if (p.causal != 0u) {
        positional = kv <= q && (p.window == 0u || kv + p.window > q);
    }
    let gq = (iq >> 1u) - 1;
    let gk = (ik >> 1u) - 1;
    return positional || (gq >= 0 && gq == gk);
}

// vec4 index of chunk c of row t, head h.
fn q_index(b: u32, t: u32, h: u32, c: u32) -> u32 {
    return ((b * p.seq + t) * p.q_heads + h) * (p.head_dim / 4u) + c;
}
fn kv_index(b: u32, t: u32, h: u32, c: u32) -> u32 {
    return ((b * p.seq + t) * p.kv_heads + h) * (p.head_dim / 4u) + c;
}

fn pos_inf() -> f32 { return bitcast<f32>(0x7f800000u); }

//== kernel forward
@group(0) @binding(1) var<storage, read> Q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> K: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> V: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> MASK: array<i32>;
@group(0) @binding(5) var<storage, read_write> O: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> LSE: array<f32>;

// One workgroup: ROWS query rows (q0 ..) of head h, sample b. Writes O and LSE.
@compute @workgroup_size(8, 1, 1)
fn attention_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let b = wg.z;
    let h = wg.y;
    let q0 = wg.x * ROWS;
    let kvh = h / (p.q_heads / p.kv_heads);
    let d4 = p.head_dim / 4u;
    let last = p.seq - 1u;

    var qv: array<vec4<f32>, 128>;   // [MAX_ROWS][MAX_SLOTS], pre-scaled
    var acc: array<vec4<f32>, 128>;  // unnormalised output rows
    var m: array<f32, MAX_ROWS>;
    var l: array<f32, MAX_ROWS>;
    var qinfo: array<i32, MAX_ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        let t = min(q0 + r, last);
        for (var s = 0u; s < SLOTS; s++) {
            let c = lane + LANES * s;
            qv[r * MAX_SLOTS + s] = select(vec4<f32>(0.0), Q[q_index(b, t, h, min(c, d4 - 1u))] * p.scale, c < d4);
            acc[r * MAX_SLOTS + s] = vec4<f32>(0.0);
        }
        m[r] = NEG;
        l[r] = 0.0;
        qinfo[r] = token_info(b, q0 + r);
    }

    let range_at = p.q_ranges_off + (b * p.q_blocks + wg.x) * 2u;
    let lo = u32(MASK[range_at]);
    let hi = u32(MASK[range_at + 1u]);
    for (var k0 = lo; k0 < hi; k0 += KB) {
        var kv: array<vec4<f32>, 64>;     // [KB][MAX_SLOTS]: K block, then V block
        var sc: array<f32, 128>;          // [MAX_ROWS][KB]: scores, then probabilities
        var kinfo: array<i32, KB>;
        for (var j = 0u; j < KB; j++) {
            kinfo[j] = token_info(b, k0 + j);
            let t = min(k0 + j, last);
            for (var s = 0u; s < SLOTS; s++) {
                let c = lane + LANES * s;
                kv[j * MAX_SLOTS + s] = select(vec4<f32>(0.0), K[kv_index(b, t, kvh, min(c, d4 - 1u))], c < d4);
            }
        }
        for (var r = 0u; r < ROWS; r++) {
            for (var j = 0u; j < KB; j++) {
                var part = 0.0;
                for (var s = 0u; s < SLOTS; s++) {
                    part += dot(qv[r * MAX_SLOTS + s], kv[j * MAX_SLOTS + s]);
                }
                let score = subgroupAdd(part);
                sc[r * KB + j] = select(NEG, score, allowed(qinfo[r], kinfo[j], q0 + r, k0 + j));
            }
        }
        for (var r = 0u; r < ROWS; r++) {
            var block_max = NEG;
            for (var j = 0u; j < KB; j++) { block_max = max(block_max, sc[r * KB + j]); }
            let m_new = max(m[r], block_max);
            let alpha = exp(m[r] - m_new);
            var sum = 0.0;
            for (var j = 0u; j < KB; j++) {
                let s = sc[r * KB + j];
                let pj = select(0.0, exp(s - m_new), s > 0.5 * NEG);
                sc[r * KB + j] = pj;
                sum += pj;
            }
            l[r] = l[r] * alpha + sum;
            m[r] = m_new;
            for (var s = 0u; s < SLOTS; s++) { acc[r * MAX_SLOTS + s] *= alpha; }
        }
        for (var j = 0u; j < KB; j++) {
            let t = min(k0 + j, last);
            for (var s = 0u; s < SLOTS; s++) {
                let c = lane + LANES * s;
                kv[j * MAX_SLOTS + s] = select(vec4<f32>(0.0), V[kv_index(b, t, kvh, min(c, d4 - 1u))], c < d4);
            }
        }
        for (var r = 0u; r < ROWS; r++) {
            for (var s = 0u; s < SLOTS; s++) {
                var o = acc[r * MAX_SLOTS + s];
                for (var j = 0u; j < KB; j++) { o += sc[r * KB + j] * kv[j * MAX_SLOTS + s]; }
                acc[r * MAX_SLOTS + s] = o;
            }
        }
    }

    for (var r = 0u; r < ROWS; r++) {
        let t = q0 + r;
        if (t < p.seq) {
            // A row that saw no key (l = 0) outputs 0 and gets lse = +inf (see the reference).
            let inv = select(0.0, 1.0 / l[r], l[r] > 0.0);
            for (var s = 0u; s < SLOTS; s++) {
                let c = lane + LANES * s;
                if (c < d4) { O[q_index(b, t, h, c)] = acc[r * MAX_SLOTS + s] * inv; }
            }
            if (lane == 0u) {
                LSE[(b * p.q_heads + h) * p.seq + t] = select(pos_inf(), m[r] + log(l[r]), l[r] > 0.0);
            }
        }
    }
}

//== kernel delta
@group(0) @binding(1) var<storage, read> O: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> DO: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> LSE: array<f32>;
@group(0) @binding(4) var<storage, read_write> STATS: array<vec2<f32>>;
@group(0) @binding(5) var<storage, read> MASK: array<i32>;

// STATS[b, h, t] = (lse, dO·O): one invocation per (b, t, h) row.
@compute @workgroup_size(64, 1, 1)
fn attention_delta(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.x + gid.y * nwg.x * 64u;
    if (row >= p.batch * p.seq * p.q_heads) { return; }
    let h = row % p.q_heads;
    let bt = row / p.q_heads;
    let d4 = p.head_dim / 4u;
    var acc = vec4<f32>(0.0);
    for (var c = 0u; c < d4; c++) {
        acc += O[row * d4 + c] * DO[row * d4 + c];
    }
    let b = bt / p.seq;
    let t = bt % p.seq;
    let at = (b * p.q_heads + h) * p.seq + t;
    STATS[at] = vec2<f32>(LSE[at], acc.x + acc.y + acc.z + acc.w);
}

//== kernel dq
@group(0) @binding(1) var<storage, read> Q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> K: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> V: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> DO: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> STATS: array<vec2<f32>>;
@group(0) @binding(6) var<storage, read> MASK: array<i32>;
@group(0) @binding(7) var<storage, read_write> DQ: array<vec4<f32>>;

// One workgroup: ROWS query rows of head h; recomputes P from the saved lse and writes dQ.
@compute @workgroup_size(8, 1, 1)
fn attention_dq(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let b = wg.z;
    let h = wg.y;
    let q0 = wg.x * ROWS;
    let kvh = h / (p.q_heads / p.kv_heads);
    let d4 = p.head_dim / 4u;
    let last = p.seq - 1u;

    var qv: array<vec4<f32>, 128>;   // pre-scaled query rows
    var dov: array<vec4<f32>, 128>;  // dO rows
    var dq: array<vec4<f32>, 128>;
    var lse: array<f32, MAX_ROWS>;
    var delta: array<f32, MAX_ROWS>;
    var qinfo: array<i32, MAX_ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        qinfo[r] = token_info(b, q0 + r);
        let t = min(q0 + r, last);
        for (var s = 0u; s < SLOTS; s++) {
            let c = lane + LANES * s;
            let at = q_index(b, t, h, min(c, d4 - 1u));
            qv[r * MAX_SLOTS + s] = select(vec4<f32>(0.0), Q[at] * p.scale, c < d4);
            dov[r * MAX_SLOTS + s] = select(vec4<f32>(0.0), DO[at], c < d4);
            dq[r * MAX_SLOTS + s] = vec4<f32>(0.0);
        }
        let st = STATS[(b * p.q_heads + h) * p.seq + t];
        lse[r] = st.x;
        delta[r] = st.y;
    }

    let range_at = p.q_ranges_off + (b * p.q_blocks + wg.x) * 2u;
    let lo = u32(MASK[range_at]);
    let hi = u32(MASK[range_at + 1u]);
    for (var k0 = lo; k0 < hi; k0 += KB) {
        var kb: array<vec4<f32>, 64>;
        var vb: array<vec4<f32>, 64>;
        var kinfo: array<i32, KB>;
        for (var j = 0u; j < KB; j++) {
            kinfo[j] = token_info(b, k0 + j);
            let t = min(k0 + j, last);
            for (var s = 0u; s < SLOTS; s++) {
                let c = lane + LANES * s;
                let at = kv_index(b, t, kvh, min(c, d4 - 1u));
                kb[j * MAX_SLOTS + s] = select(vec4<f32>(0.0), K[at], c < d4);
                vb[j * MAX_SLOTS + s] = select(vec4<f32>(0.0), V[at], c < d4);
            }
        }
        for (var r = 0u; r < ROWS; r++) {
            for (var j = 0u; j < KB; j++) {
                var part_s = 0.0;
                var part_dp = 0.0;
                for (var s = 0u; s < SLOTS; s++) {
                    part_s += dot(qv[r * MAX_SLOTS + s], kb[j * MAX_SLOTS + s]);
                    part_dp += dot(dov[r * MAX_SLOTS + s], vb[j * MAX_SLOTS + s]);
                }
                let score = subgroupAdd(part_s);
                let dp = subgroupAdd(part_dp);
                let pj = select(0.0, exp(score - lse[r]), allowed(qinfo[r], kinfo[j], q0 + r, k0 + j));
                let ds = pj * (dp - delta[r]);
                for (var s = 0u; s < SLOTS; s++) { dq[r * MAX_SLOTS + s] += ds * kb[j * MAX_SLOTS + s]; }
            }
        }
    }

    for (var r = 0u; r < ROWS; r++) {
        let t = q0 + r;
        if (t < p.seq) {
            for (var s = 0u; s < SLOTS; s++) {
                let c = lane + LANES * s;
                if (c < d4) { DQ[q_index(b, t, h, c)] = dq[r * MAX_SLOTS + s] * p.scale; }
            }
        }
    }
}

//== kernel dkdv
@group(0) @binding(1) var<storage, read> Q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> K: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> V: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> DO: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> STATS: array<vec2<f32>>;
@group(0) @binding(6) var<storage, read> MASK: array<i32>;
@group(0) @binding(7) var<storage, read_write> DK: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> DV: array<vec4<f32>>;

// One workgroup: ROWS key rows (k0 ..) of kv head kvh; streams the queries of every q head the
// kv head serves that can see them, and writes dK and dV (no atomics: each key row has one owner).
@compute @workgroup_size(8, 1, 1)
fn attention_dkdv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let b = wg.z;
    let kvh = wg.y;
    let k0 = wg.x * ROWS;
    let group = p.q_heads / p.kv_heads;
    let d4 = p.head_dim / 4u;
    let last = p.seq - 1u;

    var kr: array<vec4<f32>, 128>;   // pre-scaled key rows
    var vr: array<vec4<f32>, 128>;
    var dk: array<vec4<f32>, 128>;
    var dv: array<vec4<f32>, 128>;
    var kinfo: array<i32, MAX_ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        kinfo[r] = token_info(b, k0 + r);
        let t = min(k0 + r, last);
        for (var s = 0u; s < SLOTS; s++) {
            let c = lane + LANES * s;
            let at = kv_index(b, t, kvh, min(c, d4 - 1u));
            kr[r * MAX_SLOTS + s] = select(vec4<f32>(0.0), K[at] * p.scale, c < d4);
            vr[r * MAX_SLOTS + s] = select(vec4<f32>(0.0), V[at], c < d4);
            dk[r * MAX_SLOTS + s] = vec4<f32>(0.0);
            dv[r * MAX_SLOTS + s] = vec4<f32>(0.0);
        }
    }

    let range_at = p.k_ranges_off + (b * p.k_blocks + wg.x) * 2u;
    let lo = u32(MASK[range_at]);
    let hi = u32(MASK[range_at + 1u]);
    for (var h = kvh * group; h < kvh * group + group; h++) {
        for (var i0 = lo; i0 < hi; i0 += KB) {
            var qb: array<vec4<f32>, 64>;
            var dob: array<vec4<f32>, 64>;
            var lse: array<f32, KB>;
            var delta: array<f32, KB>;
            var qinfo: array<i32, KB>;
            for (var j = 0u; j < KB; j++) {
                qinfo[j] = token_info(b, i0 + j);
                let t = min(i0 + j, last);
                for (var s = 0u; s < SLOTS; s++) {
                    let c = lane + LANES * s;
                    let at = q_index(b, t, h, min(c, d4 - 1u));
                    qb[j * MAX_SLOTS + s] = select(vec4<f32>(0.0), Q[at], c < d4);
                    dob[j * MAX_SLOTS + s] = select(vec4<f32>(0.0), DO[at], c < d4);
                }
                let st = STATS[(b * p.q_heads + h) * p.seq + t];
                lse[j] = st.x;
                delta[j] = st.y;
            }
            for (var r = 0u; r < ROWS; r++) {
                for (var j = 0u; j < KB; j++) {
                    var part_s = 0.0;
                    var part_dp = 0.0;
                    for (var s = 0u; s < SLOTS; s++) {
                        part_s += dot(qb[j * MAX_SLOTS + s], kr[r * MAX_SLOTS + s]);
                        part_dp += dot(dob[j * MAX_SLOTS + s], vr[r * MAX_SLOTS + s]);
                    }
                    let score = subgroupAdd(part_s);
                    let dp = subgroupAdd(part_dp);
                    let pj = select(0.0, exp(score - lse[j]), allowed(qinfo[j], kinfo[r], i0 + j, k0 + r));
                    let ds = pj * (dp - delta[j]);
                    for (var s = 0u; s < SLOTS; s++) {
                        dv[r * MAX_SLOTS + s] += pj * dob[j * MAX_SLOTS + s];
                        dk[r * MAX_SLOTS + s] += ds * qb[j * MAX_SLOTS + s];
                    }
                }
            }
        }
    }

    for (var r = 0u; r < ROWS; r++) {
        let t = k0 + r;
        if (t < p.seq) {
            for (var s = 0u; s < SLOTS; s++) {
                let c = lane + LANES * s;
                if (c < d4) {
                    DK[kv_index(b, t, kvh, c)] = dk[r * MAX_SLOTS + s] * p.scale;
                    DV[kv_index(b, t, kvh, c)] = dv[r * MAX_SLOTS + s];
                }
            }
        }
    }
}

//== kernel masked_rows
// transformers' eager attention adds finfo.min to blocked scores, so a query that may see no key
// (lse = +inf here, output 0) averages V over the whole sequence instead. This writes that mean
// into such rows of O (reference: ops/src/model/reference/gemma3.rs eager_fully_masked_rows).
// Flat f32 views; one invocation per element of O.
@group(0) @binding(1) var<storage, read> V: array<f32>;
@group(0) @binding(2) var<storage, read> LSE: array<f32>;
@group(0) @binding(3) var<storage, read_write> O: array<f32>;
// Not bound by this kernel: declared only because `token_info` in the header names it.
@group(0) @binding(4) var<storage, read> MASK: array<i32>;

@compute @workgroup_size(64)
fn attention_masked_rows(@builtin(workgroup_id) wid: vec3<u32>,
                         @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) l: u32) {
    let i = (wid.x + wid.y * nwg.x) * 64u + l;
    let hd = p.head_dim;
    if (i >= p.batch * p.seq * p.q_heads * hd) { return; }
    let d = i % hd;
    let h = (i / hd) % p.q_heads;
    let t = (i / (hd * p.q_heads)) % p.seq;
    let b = i / (hd * p.q_heads * p.seq);
    if (LSE[(b * p.q_heads + h) * p.seq + t] != pos_inf()) { return; }
    let kvh = h / (p.q_heads / p.kv_heads);
    var sum = 0.0;
    for (var j = 0u; j < p.seq; j++) {
        sum += V[((b * p.seq + j) * p.kv_heads + kvh) * hd + d];
    }
    O[i] = sum / f32(p.seq);
}

// The `sg_*` sections hold only the bindings of the subgroup kernels for 8-lane CPU adapters
// (lavapipe); their entry points are generated, fully unrolled, by
// ops/src/gpu/kernels/attention.rs (`subgroup_forward` etc.), which documents them. They read
// Q, K, V and dO through ld_q, ld_k, ld_v, ld_do: from storage buffers, or in the `*_tex`
// sections from linear textures (ops/src/gpu/staging.rs: texel i at (i % 4096, i / 4096)),
// where lavapipe fetches ten times faster than it loads storage.
//== kernel sg_forward
@group(0) @binding(1) var<storage, read> Q: array<vec4<f32>>;
fn ld_q(i: u32) -> vec4<f32> { return Q[i]; }
@group(0) @binding(2) var<storage, read> K: array<vec4<f32>>;
fn ld_k(i: u32) -> vec4<f32> { return K[i]; }
@group(0) @binding(3) var<storage, read> V: array<vec4<f32>>;
fn ld_v(i: u32) -> vec4<f32> { return V[i]; }
@group(0) @binding(4) var<storage, read> MASK: array<i32>;
@group(0) @binding(5) var<storage, read_write> O: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> LSE: array<f32>;

//== kernel sg_dq
@group(0) @binding(1) var<storage, read> Q: array<vec4<f32>>;
fn ld_q(i: u32) -> vec4<f32> { return Q[i]; }
@group(0) @binding(2) var<storage, read> K: array<vec4<f32>>;
fn ld_k(i: u32) -> vec4<f32> { return K[i]; }
@group(0) @binding(3) var<storage, read> V: array<vec4<f32>>;
fn ld_v(i: u32) -> vec4<f32> { return V[i]; }
@group(0) @binding(4) var<storage, read> DO: array<vec4<f32>>;
fn ld_do(i: u32) -> vec4<f32> { return DO[i]; }
@group(0) @binding(5) var<storage, read> STATS: array<vec2<f32>>;
@group(0) @binding(6) var<storage, read> MASK: array<i32>;
@group(0) @binding(7) var<storage, read_write> DQ: array<vec4<f32>>;

//== kernel sg_dkdv
@group(0) @binding(1) var<storage, read> Q: array<vec4<f32>>;
fn ld_q(i: u32) -> vec4<f32> { return Q[i]; }
@group(0) @binding(2) var<storage, read> K: array<vec4<f32>>;
fn ld_k(i: u32) -> vec4<f32> { return K[i]; }
@group(0) @binding(3) var<storage, read> V: array<vec4<f32>>;
fn ld_v(i: u32) -> vec4<f32> { return V[i]; }
@group(0) @binding(4) var<storage, read> DO: array<vec4<f32>>;
fn ld_do(i: u32) -> vec4<f32> { return DO[i]; }
@group(0) @binding(5) var<storage, read> STATS: array<vec2<f32>>;
@group(0) @binding(6) var<storage, read> MASK: array<i32>;
@group(0) @binding(7) var<storage, read_write> DK: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> DV: array<vec4<f32>>;

//== kernel sg_forward_tex
@group(0) @binding(1) var Q: texture_2d<f32>;
fn ld_q(i: u32) -> vec4<f32> { return textureLoad(Q, vec2<u32>(i & 4095u, i >> 12u), 0); }
@group(0) @binding(2) var K: texture_2d<f32>;
fn ld_k(i: u32) -> vec4<f32> { return textureLoad(K, vec2<u32>(i & 4095u, i >> 12u), 0); }
@group(0) @binding(3) var V: texture_2d<f32>;
fn ld_v(i: u32) -> vec4<f32> { return textureLoad(V, vec2<u32>(i & 4095u, i >> 12u), 0); }
@group(0) @binding(4) var<storage, read> MASK: array<i32>;
@group(0) @binding(5) var<storage, read_write> O: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> LSE: array<f32>;

//== kernel sg_dq_tex
@group(0) @binding(1) var Q: texture_2d<f32>;
fn ld_q(i: u32) -> vec4<f32> { return textureLoad(Q, vec2<u32>(i & 4095u, i >> 12u), 0); }
@group(0) @binding(2) var K: texture_2d<f32>;
fn ld_k(i: u32) -> vec4<f32> { return textureLoad(K, vec2<u32>(i & 4095u, i >> 12u), 0); }
@group(0) @binding(3) var V: texture_2d<f32>;
fn ld_v(i: u32) -> vec4<f32> { return textureLoad(V, vec2<u32>(i & 4095u, i >> 12u), 0); }
@group(0) @binding(4) var DO: texture_2d<f32>;
fn ld_do(i: u32) -> vec4<f32> { return textureLoad(DO, vec2<u32>(i & 4095u, i >> 12u), 0); }
@group(0) @binding(5) var<storage, read> STATS: array<vec2<f32>>;
@group(0) @binding(6) var<storage, read> MASK: array<i32>;
@group(0) @binding(7) var<storage, read_write> DQ: array<vec4<f32>>;

//== kernel sg_dkdv_tex
@group(0) @binding(1) var Q: texture_2d<f32>;
fn ld_q(i: u32) -> vec4<f32> { return textureLoad(Q, vec2<u32>(i & 4095u, i >> 12u), 0); }
@group(0) @binding(2) var K: texture_2d<f32>;
fn ld_k(i: u32) -> vec4<f32> { return textureLoad(K, vec2<u32>(i & 4095u, i >> 12u), 0); }
@group(0) @binding(3) var V: texture_2d<f32>;
fn ld_v(i: u32) -> vec4<f32> { return textureLoad(V, vec2<u32>(i & 4095u, i >> 12u), 0); }
@group(0) @binding(4) var DO: texture_2d<f32>;
fn ld_do(i: u32) -> vec4<f32> { return textureLoad(DO, vec2<u32>(i & 4095u, i >> 12u), 0); }
@group(0) @binding(5) var<storage, read> STATS: array<vec2<f32>>;
@group(0) @binding(6) var<storage, read> MASK: array<i32>;
@group(0) @binding(7) var<storage, read_write> DK: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> DV: array<vec4<f32>>;
