// Embedding gather (forward) and scatter-add (backward) over a table that may be split into
// row chunks: each dispatch covers one chunk (rows first .. first + rows) and touches only
// tokens whose id falls in it. Ids at or beyond `vocab` produce NaN rows (loud, not silent).

#include "lib/dispatch"
#include "lib/bf16"

struct Params {
    tokens: u32,
    dim: u32,
    first: u32,    // first table row in this chunk
    rows: u32,     // table rows in this chunk
    vocab: u32,
    skip_id: u32,  // backward: this id gets no gradient (padding_idx); 0xFFFFFFFF for none
    scale: f32,
    round_bf16: u32, // forward: round the scaled value to bf16 (torch multiplies in bf16)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;

fn gather_value(t: u32, j: u32, row_value: f32) -> f32 {
    var v = row_value * p.scale;
    if (p.round_bf16 != 0u) { v = bf16_round(v); }
    return v;
}

@group(0) @binding(2) var<storage, read> table_f32: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn gather_f32(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 256u);
    if (i >= p.tokens * p.dim) { return; }
    let t = i / p.dim;
    let j = i % p.dim;
    let id = ids[t];
    if (id >= p.vocab) {
        if (p.first == 0u) { out[i] = bitcast<f32>(0x7fc00000u); }
        return;
    }
    if (id < p.first || id >= p.first + p.rows) { return; }
    out[i] = gather_value(t, j, table_f32[(id - p.first) * p.dim + j]);
}

@group(0) @binding(2) var<storage, read> table_bf16: array<u32>;

@compute @workgroup_size(256)
fn gather_bf16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 256u);
    if (i >= p.tokens * p.dim) { return; }
    let t = i / p.dim;
    let j = i % p.dim;
    let id = ids[t];
    if (id >= p.vocab) {
        if (p.first == 0u) { out[i] = bitcast<f32>(0x7fc00000u); }
        return;
    }
    if (id < p.first || id >= p.first + p.rows) { return; }
    let e = (id - p.first) * p.dim + j;
    let word = table_bf16[e >> 1u];
    let h = select(word >> 16u, word & 0xffffu, (e & 1u) == 0u);
    out[i] = gather_value(t, j, bf16_lo(h));
}

// scatter_add: one invocation per column; walks all tokens, so no two invocations write the
// same element (deterministic, no atomics).
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> dtable: array<f32>;

@compute @workgroup_size(64)
fn scatter_add(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    if (j >= p.dim) { return; }
    for (var t = 0u; t < p.tokens; t++) {
        let id = ids[t];
        if (id == p.skip_id || id < p.first || id >= p.first + p.rows) { continue; }
        let e = (id - p.first) * p.dim + j;
        dtable[e] = dtable[e] + dy[t * p.dim + j] * p.scale;
    }
}

// scatter_add into a bf16 table (two columns per u32 word): the tokens are grouped by id on the
// host (`uniq` ids, their positions `pos[starts[u] .. starts[u + 1]]` in token order). One
// invocation per (id, word): the id's contributions summed in f32 in token order, then added
// to the bf16 value with one rounding — no two invocations write the same word.
@group(0) @binding(1) var<storage, read> uniq: array<u32>;
@group(0) @binding(2) var<storage, read> starts: array<u32>;
@group(0) @binding(3) var<storage, read> pos: array<u32>;
@group(0) @binding(4) var<storage, read> sdy: array<f32>;
@group(0) @binding(5) var<storage, read_write> dtable_w: array<u32>;

// p.tokens = number of unique ids; p.dim even.
@compute @workgroup_size(64)
fn scatter_add_bf16(@builtin(global_invocation_id) gid: vec3<u32>) {
    let w = gid.x;
    let u = gid.y;
    if (2u * w >= p.dim || u >= p.tokens) { return; }
    let id = uniq[u];
    if (id < p.first || id >= p.first + p.rows) { return; }
    var s0 = 0.0;
    var s1 = 0.0;
    for (var i = starts[u]; i < starts[u + 1u]; i++) {
        let t = pos[i];
        s0 += sdy[t * p.dim + 2u * w] * p.scale;
        s1 += sdy[t * p.dim + 2u * w + 1u] * p.scale;
    }
    let at = ((id - p.first) * p.dim) / 2u + w;
    let old = dtable_w[at];
    dtable_w[at] = bf16_pack(bf16_lo(old) + s0, bf16_hi(old) + s1);
}
