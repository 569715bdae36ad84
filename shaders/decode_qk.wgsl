// Decoding's per-head steps between the q/k/v products and the attention in two dispatches
// instead of six: q_norm_rope (Gemma's q_norm, then RoPE, in place on q) and
// kv_norm_rope_append (k_norm and RoPE on k, written into the key cache; v into the value
// cache), or in one, qkv_norm_rope_append (the FUSED module: both, a workgroup per query head
// then per kv head; ten storage buffers, where the adapter allows them). Each step is what the separate kernels compute, in their order: rmsnorm_forward's
// lane-strided sum of squares and tree (norm.wgsl), rope's rotate-half (rope.wgsl), append's
// slot (decode_attention.wgsl); the tests compare bit for bit with those kernels and with their
// references composed (kernels/decode_attention.rs).
//
// One workgroup of 64 per (row, head); a head's normed values pass through workgroup memory.
// x: [rows, heads, head_dim]; positions [rows] u32; cos/sin [n_pos, head_dim / 2]; caches
// [rows, kv_heads, capacity, head_dim], position pos in slot pos % capacity.

#include "lib/dispatch"

#feature FUSED only qkv_norm_rope_append, the two entries' work in one dispatch

struct Params {
    rows: u32,
    heads: u32,       // of x: the query heads, or the kv heads
    head_dim: u32,    // even, <= MAX_HEAD_DIM
    n_pos: u32,
    capacity: u32,
    pos: u32,
    eps: f32,
    kv_heads: u32,    // FUSED: the kv heads (`heads` being the query heads)
}

@group(0) @binding(0) var<uniform> p: Params;

const WG: u32 = 64u;
const MAX_HEAD_DIM: u32 = 256u;
var<workgroup> head_sh: array<f32, MAX_HEAD_DIM>;
var<workgroup> w_sh: array<f32, MAX_HEAD_DIM>;   // the head's norm weight
var<workgroup> red: array<f32, WG>;

// The workgroup's sum of every lane's `v`, in the tree order of norm.wgsl's reduce2.
fn reduce(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s /= 2u) {
        if (lid < s) { red[lid] += red[lid + s]; }
        workgroupBarrier();
    }
    return red[0];
}

// ---- what the entries share: bindings 2..5 and the per-head steps
@group(0) @binding(2) var<storage, read> norm_w: array<f32>;      // [head_dim]: q's, or k's
@group(0) @binding(3) var<storage, read> positions: array<u32>;   // [rows]
@group(0) @binding(4) var<storage, read> cos_t: array<f32>;
@group(0) @binding(5) var<storage, read> sin_t: array<f32>;

// head_sh[0 .. head_dim] holds a head of row `row` and w_sh its norm weight, each lane having
// written its own columns j = lid, lid + WG, ... and summed their squares into `ss`: leaves
// rope(rmsnorm(head; w_sh)) there, published to the whole workgroup. A lane reads and writes only its own columns, then
// only its own rotation pairs.
fn norm_rope_in_shared(lid: u32, row: u32, ss: f32) {
    let rstd = inverseSqrt(reduce(lid, ss) / f32(p.head_dim) + p.eps);
    for (var j = lid; j < p.head_dim; j += WG) { head_sh[j] = head_sh[j] * rstd * (1.0 + w_sh[j]); }
    workgroupBarrier();
    let half = p.head_dim / 2u;
    let pos = min(positions[row], p.n_pos - 1u);
    for (var i = lid; i < half; i += WG) {
        let c = cos_t[pos * half + i];
        let s = sin_t[pos * half + i];
        let a = head_sh[i];
        let b = head_sh[i + half];
        head_sh[i] = a * c - b * s;
        head_sh[i + half] = b * c + a * s;
    }
    workgroupBarrier();
}

// ---- the query heads: q = rope(rmsnorm(q; w)), in place --------------------------------------
@group(0) @binding(1) var<storage, read_write> q: array<f32>;

// Head `rh` of q ([rows, heads, head_dim]).
fn q_head(lid: u32, rh: u32, heads: u32) {
    let base = rh * p.head_dim;
    var ss = 0.0;
    for (var j = lid; j < p.head_dim; j += WG) {
        let v = q[base + j];
        head_sh[j] = v;
        w_sh[j] = norm_w[j];
        ss += v * v;
    }
    norm_rope_in_shared(lid, rh / heads, ss);
    for (var j = lid; j < p.head_dim; j += WG) { q[base + j] = head_sh[j]; }
}

// ---- the kv heads: k_cache[slot] = rope(rmsnorm(k; w)), v_cache[slot] = v --------------------
@group(0) @binding(6) var<storage, read> kv_v: array<f32>;
@group(0) @binding(7) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(8) var<storage, read_write> v_cache: array<f32>;
#if FUSED
@group(0) @binding(9) var<storage, read> kv_k: array<f32>;
@group(0) @binding(10) var<storage, read> k_norm_w: array<f32>;   // [head_dim]
fn k_weight(j: u32) -> f32 { return k_norm_w[j]; }
#else
@group(0) @binding(1) var<storage, read> kv_k: array<f32>;
fn k_weight(j: u32) -> f32 { return norm_w[j]; }
#endif

// Kv head `rg` of k and v ([rows, heads, head_dim]) into slot pos % capacity of the caches.
fn kv_head(lid: u32, rg: u32, heads: u32) {
    let base = rg * p.head_dim;
    let slot = (rg * p.capacity + p.pos % p.capacity) * p.head_dim;
    var ss = 0.0;
    for (var j = lid; j < p.head_dim; j += WG) {
        let v = kv_k[base + j];
        head_sh[j] = v;
        w_sh[j] = k_weight(j);
        ss += v * v;
        v_cache[slot + j] = kv_v[base + j];
    }
    norm_rope_in_shared(lid, rg / heads, ss);
    for (var j = lid; j < p.head_dim; j += WG) { k_cache[slot + j] = head_sh[j]; }
}

#if FUSED
// Workgroups 0 .. rows * heads take the query heads, the next rows * kv_heads the kv heads.
@compute @workgroup_size(64)
fn qkv_norm_rope_append(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let i = flat_workgroup(wid, nwg);
    let query_heads = p.rows * p.heads;
    // both uniform per workgroup
    if (i < query_heads) {
        q_head(lid, i, p.heads);
    } else if (i < query_heads + p.rows * p.kv_heads) {
        kv_head(lid, i - query_heads, p.kv_heads);
    }
}
#else
@compute @workgroup_size(64)
fn q_norm_rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let rh = flat_workgroup(wid, nwg);
    if (rh >= p.rows * p.heads) { return; } // uniform per workgroup
    q_head(lid, rh, p.heads);
}

@compute @workgroup_size(64)
fn kv_norm_rope_append(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let rg = flat_workgroup(wid, nwg);
    if (rg >= p.rows * p.heads) { return; } // uniform per workgroup
    kv_head(lid, rg, p.heads);
}
#endif
