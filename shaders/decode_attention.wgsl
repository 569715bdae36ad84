// Decoding with a KV cache: one new query row per sequence attends over the cached keys and
// values, and `append` writes the new row's keys and values into the cache.
//
// Cache layout [batch, kv_heads, capacity, head_dim]; absolute position p sits in slot
// p % capacity (a sliding-window layer keeps only its window, as a ring; a full layer's
// capacity exceeds every position). Row b sees the keys first_key(b) ..= pos, first_key being
// past its left padding (start[b]) and inside the window. The plain-Rust truth is
// ops/engine/src/reference/decode_attention.rs.

#include "lib/dispatch"

struct Params {
    batch: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,   // <= MAX_HEAD_DIM
    capacity: u32,
    pos: u32,        // the query's absolute position (its key and value are in the cache)
    window: u32,     // 0 = full attention
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;

const WG: u32 = 64u;
const MAX_HEAD_DIM: u32 = 256u;

fn slot_base(b: u32, g: u32, position: u32) -> u32 {
    return ((b * p.kv_heads + g) * p.capacity + position % p.capacity) * p.head_dim;
}

// ---- append: cache[b, g, pos % capacity, :] = new[b, g, :] ---------------------------------

@group(0) @binding(1) var<storage, read> new_rows: array<f32>;      // [batch, kv_heads, head_dim]
@group(0) @binding(2) var<storage, read_write> cache: array<f32>;   // [batch, kv_heads, capacity, head_dim]

@compute @workgroup_size(256)
fn append(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 256u);
    if (i >= p.batch * p.kv_heads * p.head_dim) { return; }
    let bg = i / p.head_dim;
    let d = i % p.head_dim;
    cache[(bg * p.capacity + p.pos % p.capacity) * p.head_dim + d] = new_rows[i];
}

// ---- prefill: the prompt's keys or values into the cache -----------------------------------
// Here p.pos is the prompt length n (the position the first decode step takes): new_rows is
// [batch, n, kv_heads, head_dim] (the prompt forward's rows) and positions max(0, n - capacity)
// .. n - 1 go to their slots; older ones would be overwritten in a ring anyway, and writing only
// the last `capacity` keeps two threads off one slot.

@compute @workgroup_size(256)
fn prefill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 256u);
    let kept = min(p.pos, p.capacity);
    let row = p.kv_heads * p.head_dim;
    if (i >= p.batch * kept * row) { return; }
    let b = i / (kept * row);
    let t = p.pos - kept + (i / row) % kept;
    let g = (i / p.head_dim) % p.kv_heads;
    let d = i % p.head_dim;
    cache[((b * p.kv_heads + g) * p.capacity + t % p.capacity) * p.head_dim + d] =
        new_rows[((b * p.pos + t) * p.kv_heads + g) * p.head_dim + d];
}

// ---- decode: one workgroup per (row, query head) ---------------------------------------------
// Pass 1: the maximum score (each lane over keys lane, lane + 64, ...). Pass 2, over tiles of 64
// keys: each lane computes one key's weight exp(s - max) into shared memory, then each lane
// accumulates weight x value for the dimensions it owns (d = lane, lane + 64, ...). The q row
// and the accumulator live in workgroup memory (no private arrays: lavapipe spills them).

@group(0) @binding(1) var<storage, read> q: array<f32>;             // [batch, heads, head_dim]
@group(0) @binding(2) var<storage, read> k_cache: array<f32>;
@group(0) @binding(3) var<storage, read> v_cache: array<f32>;
@group(0) @binding(4) var<storage, read> start: array<u32>;         // [batch]
@group(0) @binding(5) var<storage, read_write> out: array<f32>;     // [batch, heads, head_dim]

var<workgroup> q_sh: array<f32, MAX_HEAD_DIM>;
var<workgroup> acc_sh: array<f32, MAX_HEAD_DIM>;
var<workgroup> w_sh: array<f32, WG>;
var<workgroup> red: array<f32, WG>;
var<workgroup> lo_sh: u32;

fn score(b: u32, g: u32, position: u32) -> f32 {
    let base = slot_base(b, g, position);
    var s = 0.0;
    for (var d = 0u; d < p.head_dim; d++) {
        s += q_sh[d] * k_cache[base + d];
    }
    return s * p.scale;
}

@compute @workgroup_size(64)
fn decode(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) l: u32) {
    let bh = flat_workgroup(wid, nwg);
    if (bh >= p.batch * p.heads) { return; }
    let b = bh / p.heads;
    let g = (bh % p.heads) / (p.heads / p.kv_heads);
    let qbase = bh * p.head_dim;
    for (var d = l; d < p.head_dim; d += WG) {
        q_sh[d] = q[qbase + d];
        acc_sh[d] = 0.0;
    }
    if (l == 0u) {
        var lo = start[b];
        if (p.window != 0u && p.pos + 1u > p.window) {
            lo = max(lo, p.pos + 1u - p.window);
        }
        lo_sh = lo;
    }
    // The key range is the same for the whole workgroup: loops with barriers below need it so.
    let lo = workgroupUniformLoad(&lo_sh);

    var m = -3.0e38;
    for (var j = lo + l; j <= p.pos; j += WG) {
        m = max(m, score(b, g, j));
    }
    red[l] = m;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (l < s) { red[l] = max(red[l], red[l + s]); }
        workgroupBarrier();
    }
    let row_max = red[0];
    workgroupBarrier();

    var sum = 0.0;
    for (var t0 = lo; t0 <= p.pos; t0 += WG) {
        let j = t0 + l;
        var w = 0.0;
        if (j <= p.pos) {
            w = exp(score(b, g, j) - row_max);
        }
        sum += w;
        w_sh[l] = w;
        workgroupBarrier();
        let n = min(WG, p.pos + 1u - t0);
        for (var d = l; d < p.head_dim; d += WG) {
            var a = acc_sh[d];
            for (var k = 0u; k < n; k++) {
                a += w_sh[k] * v_cache[slot_base(b, g, t0 + k) + d];
            }
            acc_sh[d] = a;
        }
        workgroupBarrier();
    }
    red[l] = sum;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (l < s) { red[l] = red[l] + red[l + s]; }
        workgroupBarrier();
    }
    let total = red[0];
    for (var d = l; d < p.head_dim; d += WG) {
        // A row that sees no key (all padding) gets zeros, not NaN.
        out[qbase + d] = select(0.0, acc_sh[d] / total, total > 0.0);
    }
}
