// Up to three products of one x in one dispatch: C_j [M, N_j] = x [M, K] · W_jᵀ (W_j [N_j, K],
// f32 with K % 4 == 0, or all bf16 with K % 8 == 0), for decoding (q/k/v, gate/up) on CPU adapters, where every dispatch has a fixed cost
// comparable to a small product's and a product with few rows (k_proj: 256) keeps few workgroups
// busy. x and the packed weights are staged linear textures (ops/engine/src/gpu/staging.rs): x
// [M, K] from element 0, W_j from element b_off[j] (each member starts on a texture row). The
// plain-Rust truth is one reference matmul per member (kernels/matmul/grouped.rs's tests).
//
// The layout and inner loop are matmul_rows_split's (lib/rows_split). A workgroup's outputs lie
// in one member: member j owns workgroups first_group[j] .. first_group[j + 1], so the member,
// its offset and its output binding are the same for the whole workgroup.
//
// `matmul_rows_geglu` takes two members of equal N, gate and up (Gemma's MLP): each workgroup
// computes the same rows of both and stores C0 = gelu(gate) · up, what `geglu_forward`
// (shaders/activation.wgsl, the same lib/gelu) computes from the two products' outputs, in one
// dispatch instead of two and without writing gate and up.

#feature BF16B the weights are bf16, staged as u32 words (eight elements per texel)
#feature ROW_BLOCKS the weights are staged in row blocks (shaders/row_blocks.wgsl), each from its texture row, instead of linearly

#include "lib/staging"
#if BF16B
#include "lib/bf16"
#endif
#include "lib/rows_split"
#include "lib/gelu"

struct Params {
    m: u32,
    k: u32,
    members: u32,
    _pad: u32,
    n: vec4<u32>,            // N_j
    b_off: vec4<u32>,        // element of W_j[0, 0] in the packed texture
    first_group: vec4<u32>,  // first workgroup (x) of member j
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var A_in: texture_storage_2d<rgba32float, read>;
#if BF16B
@group(0) @binding(2) var B_in: texture_storage_2d<rgba32uint, read>;
#else
@group(0) @binding(2) var B_in: texture_storage_2d<rgba32float, read>;
#endif
@group(0) @binding(3) var<storage, read_write> C0: array<f32>;
@group(0) @binding(4) var<storage, read_write> C1: array<f32>;
@group(0) @binding(5) var<storage, read_write> C2: array<f32>;

// Four elements from e % 4 == 0: the caller keeps K % 4 == 0, so every row starts on a texel.
fn a4(e: u32) -> vec4<f32> { return textureLoad(A_in, stage_texel(e >> 2u)); }
#if BF16B
fn b8(e: u32) -> vec4<u32> { return textureLoad(B_in, stage_texel(e >> 3u)); }
fn b4(e: u32) -> vec4<f32> {
    let w = select(b8(e & ~7u).xy, b8(e & ~7u).zw, (e & 4u) != 0u);
    return vec4<f32>(bf16_lo(w.x), bf16_hi(w.x), bf16_lo(w.y), bf16_hi(w.y));
}
#else
fn b4(e: u32) -> vec4<f32> { return textureLoad(B_in, stage_texel(e >> 2u)); }
#endif

fn store(j: u32, idx: u32, v: f32) {
    switch j {
        case 0u: { C0[idx] = v; }
        case 1u: { C1[idx] = v; }
        default: { C2[idx] = v; }
    }
}

@compute @workgroup_size(SPLIT_LANES * SPLIT_SUBGROUPS)
fn matmul_rows_group(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    var j = 0u;
    if (p.members > 1u && wid.x >= p.first_group[1]) { j = 1u; }
    if (p.members > 2u && wid.x >= p.first_group[2]) { j = 2u; }
    let n_j = p.n[j];
    let lane = lid % SPLIT_LANES;
    let n0 = split_first_row(wid.x - p.first_group[j], lid);
    let m = wid.y;
    let b_base = split_b_bases(p.b_off[j], p.k, n0, n_j);
#if BF16B
    let acc = split_partials_bf16(m * p.k, b_base, p.k, lane);
#else
    let acc = split_partials(m * p.k, b_base, p.k, lane);
#endif
    for (var r = 0u; r < SPLIT_ROWS; r++) {
        let total = subgroupAdd(acc[r].x + acc[r].y);
        if (lane == r % SPLIT_LANES && n0 + r < n_j) {
            store(j, m * n_j + n0 + r, total);
        }
    }
}

// A lane's partial sums of member j's rows from n0 (see matmul_rows_group).
fn member_partials(j: u32, m: u32, n0: u32, lane: u32) -> array<vec2<f32>, 8> {
    let b_base = split_b_bases(p.b_off[j], p.k, n0, p.n[j]);
#if BF16B
    return split_partials_bf16(m * p.k, b_base, p.k, lane);
#else
    return split_partials(m * p.k, b_base, p.k, lane);
#endif
}

@compute @workgroup_size(SPLIT_LANES * SPLIT_SUBGROUPS)
fn matmul_rows_geglu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n = p.n[0];
    let lane = lid % SPLIT_LANES;
    let n0 = split_first_row(wid.x, lid);
    let m = wid.y;
    // every lane holds every row's gate total (subgroupAdd is uniform); the up totals follow
    var gate: array<f32, 8>;
    let gate_acc = member_partials(0u, m, n0, lane);
    for (var r = 0u; r < SPLIT_ROWS; r++) { gate[r] = subgroupAdd(gate_acc[r].x + gate_acc[r].y); }
    let up_acc = member_partials(1u, m, n0, lane);
    for (var r = 0u; r < SPLIT_ROWS; r++) {
        let up = subgroupAdd(up_acc[r].x + up_acc[r].y);
        if (lane == r % SPLIT_LANES && n0 + r < n) {
            C0[m * n + n0 + r] = gelu(gate[r]) * up;
        }
    }
}
