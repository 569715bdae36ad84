// Decoding with a KV cache: one new query row per sequence attends over the cached keys and
// values, and `append` writes the new row's keys and values into the cache.
//
// Cache layout [batch, kv_heads, capacity, head_dim]; absolute position p sits in slot
// p % capacity (a sliding-window layer keeps only its window, as a ring; a full layer's
// capacity exceeds every position). Row b sees the keys first_key(b) ..= pos, first_key being
// past its left padding (start[b]) and inside the window. The plain-Rust truth is
// ops/engine/src/reference/decode_attention.rs.

#include "lib/dispatch"

#feature VEC4 q, the caches and out read as vec4 (head_dim a multiple of 4): the decode kernel only
#feature TEXTURES only `decode_subgroup`, the decode kernel for CPU adapters: the caches read from staged linear textures (ops/engine/src/gpu/staging.rs)

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

// A slot one step past the ring's end wrapped to its start (the keys a query sees never
// exceed the capacity, so one subtraction suffices): a division per key costs on CPUs, where
// it is emulated lane by lane.
fn wrap(slot: u32) -> u32 {
    return select(slot, slot - p.capacity, slot >= p.capacity);
}

@group(0) @binding(4) var<storage, read> start: array<u32>;         // [batch]

#if !TEXTURES
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
// One pass over the keys in tiles of TILE (online softmax): each lane scores keys l, l + WG, ...
// of the tile into `sc` (the q row in workgroup memory), the tile's maximum rescales the running
// sums, the scores become weights exp(s - max), and lane l accumulates weight × value for the
// dimensions it owns in a private vec4: the fourth l of the row (VEC4), else dimensions l,
// l + 64, l + 128, l + 192. Lane partials are combined by every lane reading all WG of them
// after one barrier (llvmpipe pays per barrier, not per workgroup-memory read). A Gemma sliding
// window (1024 keys) is one tile.

const TILE: u32 = 1024u;

var<workgroup> q_sh: array<vec4<f32>, 64>;   // MAX_HEAD_DIM / 4; zero past head_dim
var<workgroup> sc: array<f32, TILE>;
var<workgroup> red: array<f32, WG>;
var<workgroup> lo_sh: u32;

#if VEC4
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;       // [batch, heads, head_dim]
@group(0) @binding(2) var<storage, read> k_cache: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v_cache: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> out: array<vec4<f32>>; // [batch, heads, head_dim]

fn load_q(qbase: u32, i: u32) -> vec4<f32> {
    if (i < p.head_dim / 4u) { return q[qbase / 4u + i]; }
    return vec4<f32>(0.0);
}

fn score(cache_row: u32, slot: u32) -> f32 {
    let base = (cache_row + slot * p.head_dim) / 4u;
    var s = vec4<f32>(0.0);
    for (var i = 0u; i < p.head_dim / 4u; i++) {
        s = fma(q_sh[i], k_cache[base + i], s);
    }
    return ((s.x + s.y) + (s.z + s.w)) * p.scale;
}

fn owns_dims(l: u32) -> bool { return l < p.head_dim / 4u; }

fn value(base: u32, l: u32) -> vec4<f32> { return v_cache[base / 4u + l]; }

fn store_out(qbase: u32, l: u32, v: vec4<f32>) { out[qbase / 4u + l] = v; }
#else
@group(0) @binding(1) var<storage, read> q: array<f32>;             // [batch, heads, head_dim]
@group(0) @binding(2) var<storage, read> k_cache: array<f32>;
@group(0) @binding(3) var<storage, read> v_cache: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;     // [batch, heads, head_dim]

fn q_at(qbase: u32, d: u32) -> f32 {
    if (d < p.head_dim) { return q[qbase + d]; }
    return 0.0;
}

fn load_q(qbase: u32, i: u32) -> vec4<f32> {
    return vec4<f32>(q_at(qbase, 4u * i), q_at(qbase, 4u * i + 1u), q_at(qbase, 4u * i + 2u),
                     q_at(qbase, 4u * i + 3u));
}

fn score(cache_row: u32, slot: u32) -> f32 {
    let base = cache_row + slot * p.head_dim;
    var s = 0.0;
    for (var d = 0u; d < p.head_dim; d++) {
        s = fma(q_sh[d >> 2u][d & 3u], k_cache[base + d], s);
    }
    return s * p.scale;
}

fn owns_dims(l: u32) -> bool { return l < p.head_dim; }

fn v_at(base: u32, d: u32) -> f32 {
    if (d < p.head_dim) { return v_cache[base + d]; }
    return 0.0;
}

fn value(base: u32, l: u32) -> vec4<f32> {
    return vec4<f32>(v_at(base, l), v_at(base, l + WG), v_at(base, l + 2u * WG), v_at(base, l + 3u * WG));
}

fn store_out(qbase: u32, l: u32, v: vec4<f32>) {
    for (var j = 0u; j < 4u; j++) {
        if (l + j * WG < p.head_dim) { out[qbase + l + j * WG] = v[j]; }
    }
}
#endif

@compute @workgroup_size(64)
fn decode(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) l: u32) {
    let bh = flat_workgroup(wid, nwg);
    if (bh >= p.batch * p.heads) { return; }
    let b = bh / p.heads;
    let g = (bh % p.heads) / (p.heads / p.kv_heads);
    let qbase = bh * p.head_dim;
    let cache_row = (b * p.kv_heads + g) * p.capacity * p.head_dim;
    q_sh[l] = load_q(qbase, l);
    if (l == 0u) {
        var lo = start[b];
        if (p.window != 0u && p.pos + 1u > p.window) {
            lo = max(lo, p.pos + 1u - p.window);
        }
        lo_sh = lo;
    }
    // The key range is the same for the whole workgroup: loops with barriers below need it so
    // (workgroupUniformLoad is also the barrier that publishes q_sh).
    let lo = workgroupUniformLoad(&lo_sh);

    var m = -3.0e38;        // the running maximum (the same in every lane)
    var lane_sum = 0.0;     // this lane's keys' share of sum(exp(s - m))
    var acc = vec4<f32>(0.0);
    for (var t0 = lo; t0 <= p.pos; t0 += TILE) {
        let n = min(TILE, p.pos + 1u - t0);
        var tile_max = -3.0e38;
        let first_slot = t0 % p.capacity;
        for (var i = l; i < n; i += WG) {
            let s = score(cache_row, wrap(first_slot + i));
            sc[i] = s;
            tile_max = max(tile_max, s);
        }
        red[l] = tile_max;
        workgroupBarrier();
        var m_new = m;
        for (var i = 0u; i < WG; i++) { m_new = max(m_new, red[i]); }
        // On the first tile m is -3e38: the factor is 0 and so are the sums it scales.
        let rescale = exp(m - m_new);
        m = m_new;
        lane_sum *= rescale;
        acc *= rescale;
        for (var i = l; i < n; i += WG) {
            let w = exp(sc[i] - m);
            sc[i] = w;
            lane_sum += w;
        }
        workgroupBarrier();
        if (owns_dims(l)) {
            var slot = first_slot;
            for (var k = 0u; k < n; k++) {
                acc = fma(vec4<f32>(sc[k]), value(cache_row + slot * p.head_dim, l), acc);
                slot = wrap(slot + 1u);
            }
        }
        // sc and red are rewritten by the next tile
        workgroupBarrier();
    }
    red[l] = lane_sum;
    workgroupBarrier();
    var total = 0.0;
    for (var i = 0u; i < WG; i++) { total += red[i]; }
    if (owns_dims(l)) {
        // A row that sees no key (all padding) gets zeros, not NaN.
        store_out(qbase, l, select(vec4<f32>(0.0), acc / total, total > 0.0));
    }
}
#endif

#if TEXTURES
// ---- decode_subgroup: the decode kernel for CPU adapters (staged caches, one subgroup width) ---
// One workgroup of one subgroup per (row, query head), laid out for SIMD lanes: the subgroup
// walks the keys one at a time with its LANES lanes across head_dim (lane l holds texels
// l, l + LANES, ... of q, of each key and value row, and of its accumulator, in
// registers), so every load of a key or value row is neighbouring texels of a staged texture,
// the score is a subgroupAdd, and neither workgroup memory nor a barrier is touched. `decode`
// keeps q and the weights in workgroup memory and spreads the keys over lanes: llvmpipe ran it
// 2.5-3x slower (per-lane loads of workgroup memory and storage buffers), and splitting the
// keys over several subgroups of a workgroup gained nothing there (llvmpipe runs a workgroup
// on one thread) while their merge's barrier cost more than the walk of a 128-key window.
#include "lib/staging"

override LANES: u32 = 8u;
// texels of a head row per lane at the narrowest subgroup the engine stages for (4 lanes)
const MAX_LANE_TEXELS: u32 = MAX_HEAD_DIM / 16u;

@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;           // [batch, heads, head_dim]
@group(0) @binding(2) var k_tex: texture_storage_2d<rgba32float, read>; // k_cache, staged
@group(0) @binding(3) var v_tex: texture_storage_2d<rgba32float, read>; // v_cache, staged
@group(0) @binding(5) var<storage, read_write> out: array<vec4<f32>>;   // [batch, heads, head_dim]

@compute @workgroup_size(LANES)
fn decode_subgroup(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lane: u32) {
    let bh = flat_workgroup(wid, nwg);
    if (bh >= p.batch * p.heads) { return; }
    let b = bh / p.heads;
    let g = (bh % p.heads) / (p.heads / p.kv_heads);
    let row_texels = p.head_dim / 4u;
    let lane_texels = (row_texels + LANES - 1u) / LANES;
    let q_base = bh * row_texels;
    let cache_base = (b * p.kv_heads + g) * p.capacity * row_texels;

    // lane_texels of these are used; a texel past the row (t >= row_texels) is zero in q and
    // never stored, and its loads are clamped into the row
    var qr: array<vec4<f32>, MAX_LANE_TEXELS>;
    var acc: array<vec4<f32>, MAX_LANE_TEXELS>;
    for (var j = 0u; j < MAX_HEAD_DIM / 4u / LANES; j++) {
        let t = lane + j * LANES;
        qr[j] = select(vec4<f32>(0.0), q[q_base + min(t, row_texels - 1u)], t < row_texels);
        acc[j] = vec4<f32>(0.0);
    }

    // keys lo ..= pos: past the row's left padding, inside the window
    var lo = start[b];
    if (p.window != 0u && p.pos + 1u > p.window) { lo = max(lo, p.pos + 1u - p.window); }
    // the ring slot of key lo, then stepped (at most capacity keys are visible)
    var slot = lo % p.capacity;
    var m = -3.0e38;   // the maximum score so far
    var sum = 0.0;     // sum of exp(score - m) over the keys so far
    for (var key = lo; key <= p.pos; key++) {
        let row = cache_base + slot * row_texels;
        var d = vec4<f32>(0.0);
        for (var j = 0u; j < MAX_HEAD_DIM / 4u / LANES; j++) {
            if (j < lane_texels) {
                let t = min(lane + j * LANES, row_texels - 1u);
                d = fma(qr[j], textureLoad(k_tex, stage_texel(row + t)), d);
            }
        }
        let s = subgroupAdd((d.x + d.y) + (d.z + d.w)) * p.scale;
        let m_new = max(m, s);
        // at the first key m is -3e38: the factor is 0 and so is everything it scales
        let rescale = exp(m - m_new);
        let w = exp(s - m_new);
        sum = fma(sum, rescale, w);
        for (var j = 0u; j < MAX_HEAD_DIM / 4u / LANES; j++) {
            if (j < lane_texels) {
                let t = min(lane + j * LANES, row_texels - 1u);
                acc[j] = fma(vec4<f32>(w), textureLoad(v_tex, stage_texel(row + t)), acc[j] * rescale);
            }
        }
        m = m_new;
        slot = wrap(slot + 1u);
    }
    for (var j = 0u; j < MAX_HEAD_DIM / 4u / LANES; j++) {
        let t = lane + j * LANES;
        if (t < row_texels) {
            // A row that sees no key (all padding) gets zeros, not NaN.
            out[q_base + t] = select(vec4<f32>(0.0), acc[j] / sum, sum > 0.0);
        }
    }
}
#endif
