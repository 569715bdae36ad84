// Reductions to a scalar in two stages: `partial` (one workgroup per SEG elements writes one
// partial result at partials[out_index + workgroup]) and `finish` (one workgroup folds
// partials[0..count] into out[0]). Modes: 0 sum, 1 max, 2 sum of squares, 3 sqrt(sum) in
// finish (the global L2 norm over many tensors: partial sums of squares of every tensor, then
// one finish). `clip_scale` multiplies a tensor in place by min(1, max_norm / (norm + 1e-6)),
// torch's clip_grad_norm_ coefficient, reading the norm from the GPU (no read-back).

#include "lib/dispatch"
#include "lib/staging"
#include "lib/bf16"

struct Params {
    n: u32,
    mode: u32,
    out_index: u32,
    max_norm: f32,
}

@group(0) @binding(0) var<uniform> p: Params;

const WG: u32 = 256u;
const ITEMS: u32 = 16u;
var<workgroup> red: array<f32, 256>;

fn combine(a: f32, b: f32) -> f32 {
    if (p.mode == 1u) { return max(a, b); }
    return a + b;
}

fn identity() -> f32 {
    if (p.mode == 1u) { return bitcast<f32>(0xff800000u); } // -inf
    return 0.0;
}

fn tree(lid: u32) {
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s /= 2u) {
        if (lid < s) { red[lid] = combine(red[lid], red[lid + s]); }
        workgroupBarrier();
    }
}

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;

@compute @workgroup_size(256)
fn partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let g = flat_workgroup(wid, nwg);
    let start = g * WG * ITEMS;
    var acc = identity();
    for (var k = 0u; k < ITEMS; k++) {
        let i = start + k * WG + lid;
        if (i < p.n) {
            let v = x[i];
            if (p.mode == 2u) { acc += v * v; } else { acc = combine(acc, v); }
        }
    }
    red[lid] = acc;
    tree(lid);
    if (lid == 0u) { partials[p.out_index + g] = red[0]; }
}

@group(0) @binding(1) var<storage, read> fin_in: array<f32>;
@group(0) @binding(2) var<storage, read_write> fin_out: array<f32>;

@compute @workgroup_size(256)
fn finish(@builtin(local_invocation_index) lid: u32) {
    var acc = identity();
    for (var i = lid; i < p.n; i += WG) { acc = combine(acc, fin_in[i]); }
    red[lid] = acc;
    tree(lid);
    if (lid == 0u) {
        var r = red[0];
        if (p.mode == 3u) { r = sqrt(r); }
        fin_out[0] = r;
    }
}

@group(0) @binding(1) var<storage, read_write> clip_x: array<f32>;
@group(0) @binding(2) var<storage, read> clip_norm: array<f32>;

@compute @workgroup_size(256)
fn clip_scale(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = flat_invocation(wid, nwg, lid, WG);
    if (i >= p.n) { return; }
    let coef = min(p.max_norm / (clip_norm[0] + 1e-6), 1.0);
    clip_x[i] = clip_x[i] * coef;
}

// The same kernels over a linear texture copy of x (ops/engine/src/gpu/staging.rs: texel t at
// (t % 4096, t / 4096), four elements each), for CPU adapters where a texel fetch costs a tenth
// of a storage load. `partial_tex` covers SEG elements per workgroup as `partial` does (texels
// past n hold whatever followed x in its buffer and are masked); `clip_scale4_tex` writes four
// elements per invocation through a vec4 view (n a multiple of 4; p.n counts vec4s).
@group(0) @binding(1) var<storage, read_write> tex_partials: array<f32>;
@group(0) @binding(2) var xt: texture_storage_2d<rgba32float, read>;

fn x_texel(t: u32) -> vec4<f32> { return textureLoad(xt, stage_texel(t)); }

fn fold_element(acc: f32, v: f32, i: u32) -> f32 {
    if (i >= p.n) { return acc; }
    if (p.mode == 2u) { return acc + v * v; }
    return combine(acc, v);
}

@compute @workgroup_size(256)
fn partial_tex(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let g = flat_workgroup(wid, nwg);
    let first = g * WG * (ITEMS / 4u);
    var acc = identity();
    for (var k = 0u; k < ITEMS / 4u; k++) {
        let t = first + k * WG + lid;
        let v = x_texel(t);
        acc = fold_element(acc, v.x, 4u * t);
        acc = fold_element(acc, v.y, 4u * t + 1u);
        acc = fold_element(acc, v.z, 4u * t + 2u);
        acc = fold_element(acc, v.w, 4u * t + 3u);
    }
    red[lid] = acc;
    tree(lid);
    if (lid == 0u) { tex_partials[p.out_index + g] = red[0]; }
}

@group(0) @binding(1) var<storage, read_write> clip_out4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> clip_norm4: array<f32>;
@group(0) @binding(3) var clip_xt: texture_storage_2d<rgba32float, read>;

@compute @workgroup_size(256)
fn clip_scale4_tex(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = flat_invocation(wid, nwg, lid, WG);
    if (i >= p.n) { return; }
    let coef = min(p.max_norm / (clip_norm4[0] + 1e-6), 1.0);
    clip_out4[i] = textureLoad(clip_xt, stage_texel(i)) * coef;
}

// The same over a bf16 tensor (two elements per u32 word; p.n counts elements): `partial_bf16`
// covers SEG elements per workgroup as `partial` does; `clip_scale_bf16` scales in place, each
// product rounded to bf16 (torch's in-place `mul_` on a bf16 gradient).
@group(0) @binding(1) var<storage, read> xw: array<u32>;
@group(0) @binding(2) var<storage, read_write> bf16_partials: array<f32>;

@compute @workgroup_size(256)
fn partial_bf16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let g = flat_workgroup(wid, nwg);
    let first = g * WG * (ITEMS / 2u);
    var acc = identity();
    for (var k = 0u; k < ITEMS / 2u; k++) {
        let w = first + k * WG + lid;
        if (2u * w < p.n) {
            let word = xw[w];
            acc = fold_element(acc, bf16_lo(word), 2u * w);
            acc = fold_element(acc, bf16_hi(word), 2u * w + 1u);
        }
    }
    red[lid] = acc;
    tree(lid);
    if (lid == 0u) { bf16_partials[p.out_index + g] = red[0]; }
}

@group(0) @binding(1) var<storage, read_write> clip_w: array<u32>;
@group(0) @binding(2) var<storage, read> clip_norm_bf16: array<f32>;

@compute @workgroup_size(256)
fn clip_scale_bf16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let w = flat_invocation(wid, nwg, lid, WG);
    if (2u * w >= p.n) { return; }
    let coef = min(p.max_norm / (clip_norm_bf16[0] + 1e-6), 1.0);
    let word = clip_w[w];
    let lo = bf16_bits(bf16_lo(word) * coef);
    var hi = word >> 16u;
    if (2u * w + 1u < p.n) { hi = bf16_bits(bf16_hi(word) * coef); }
    clip_w[w] = lo | (hi << 16u);
}
