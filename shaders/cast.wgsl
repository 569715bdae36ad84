// f32 ⇄ bf16 casts. bf16 is packed two per u32 (element 2i in the low half). f32 → bf16 rounds
// to nearest even like torch; NaN becomes a quiet NaN. Offsets (elements) let one dispatch
// cover a row range of chunked tensors; bf16 offsets are even (chunks hold whole words).

#include "lib/dispatch"
#include "lib/bf16"

struct Params {
    n: u32,
    src_off: u32,
    dst_off: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

@group(0) @binding(1) var<storage, read> f32_in: array<f32>;
@group(0) @binding(2) var<storage, read_write> bf16_out: array<u32>;

// One invocation per output word (two elements).
@compute @workgroup_size(256)
fn f32_to_bf16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) l: u32) {
    let w = flat_invocation(wid, nwg, l, 256u);
    let e = 2u * w;
    if (e >= p.n) { return; }
    let lo = bf16_bits(f32_in[p.src_off + e]);
    var hi = 0u;
    if (e + 1u < p.n) { hi = bf16_bits(f32_in[p.src_off + e + 1u]); }
    bf16_out[p.dst_off / 2u + w] = lo | (hi << 16u);
}

@group(0) @binding(1) var<storage, read> bf16_in: array<u32>;
@group(0) @binding(2) var<storage, read_write> f32_out: array<f32>;

@compute @workgroup_size(256)
fn bf16_to_f32(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 256u);
    if (i >= p.n) { return; }
    let e = p.src_off + i;
    let word = bf16_in[e >> 1u];
    let h = select(word >> 16u, word & 0xffffu, (e & 1u) == 0u);
    f32_out[p.dst_off + i] = bf16_lo(h);
}

// dst (bf16) += src (f32), rounded once per element: how a bf16 gradient takes the f32 product
// of one micro-batch (torch adds a bf16 matmul result into the bf16 `.grad`). One invocation
// per dst word; with an odd n the last word's high half is left as it was.
@group(0) @binding(1) var<storage, read> add_src: array<f32>;
@group(0) @binding(2) var<storage, read_write> add_dst: array<u32>;

@compute @workgroup_size(256)
fn add_f32_into_bf16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) l: u32) {
    let w = flat_invocation(wid, nwg, l, 256u);
    let e = 2u * w;
    if (e >= p.n) { return; }
    let at = p.dst_off / 2u + w;
    let old = add_dst[at];
    let lo = bf16_bits(bf16_lo(old) + add_src[p.src_off + e]);
    var hi = old >> 16u;
    if (e + 1u < p.n) { hi = bf16_bits(bf16_hi(old) + add_src[p.src_off + e + 1u]); }
    add_dst[at] = lo | (hi << 16u);
}
