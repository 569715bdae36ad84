// Flash-style attention (online softmax; never a seq×seq matrix), forward and backward.
// Reference: ops/engine/src/reference/attention.rs (layouts, mask rule, fully-masked rows).
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
// finished by lane_sum: subgroupAdd where the adapter's subgroups hold the workgroup's 8 lanes
// (SUBGROUPS), otherwise a sum through workgroup memory (adapters without subgroups, or with
// subgroups narrower than 8 lanes).
//
// This module is the common header; each kernel is a module of its own in shaders/attention/
// (its bindings and entry point) that includes it. The `sg_*` kernels for 8-lane CPU adapters
// are generated in Rust (ops/engine/src/gpu/kernels/attention/codegen.rs) after their bindings.
//
// MASK buffer (i32): [0, batch*seq): per token (group + 1) * 2 + valid, where group is the image
// group (-1 for text) and valid the attention_mask bit; then at q_ranges_off, per (batch, query
// block) the key range [lo, hi) that can hold visible keys; at k_ranges_off, per (batch, key
// block) the query range [lo, hi) that can see them. Ranges only skip work: the exact rule is
// `allowed` below, evaluated per (query, key).

#include "lib/dispatch"
#include "lib/staging"

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

#feature SUBGROUPS lane sums by subgroupAdd (every subgroup at least LANES wide); without it through workgroup memory
#if SUBGROUPS
fn lane_sum(x: f32, lane: u32) -> f32 { return subgroupAdd(x); }

// The key (forward, dQ) or query (dK/dV) block range [lo, hi) stored at MASK[at].
fn block_range(at: u32, lane: u32) -> vec2<u32> { return vec2<u32>(u32(MASK[at]), u32(MASK[at + 1u])); }
#else
var<workgroup> lane_partials: array<f32, LANES>;
fn lane_sum(x: f32, lane: u32) -> f32 {
    lane_partials[lane] = x;
    workgroupBarrier();
    var s = 0.0;
    for (var i = 0u; i < LANES; i++) { s += lane_partials[i]; }
    // every lane has read before the next call overwrites
    workgroupBarrier();
    return s;
}

// As above, loaded through workgroup memory so that the loops over the range (which hold the
// barriers of lane_sum) are uniform control flow.
var<workgroup> range_shared: vec2<u32>;
fn block_range(at: u32, lane: u32) -> vec2<u32> {
    if (lane == 0u) { range_shared = vec2<u32>(u32(MASK[at]), u32(MASK[at + 1u])); }
    return workgroupUniformLoad(&range_shared);
}
#endif
