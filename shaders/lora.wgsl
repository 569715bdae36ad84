// LoRA dropout with a regenerable mask:
// out[i] = beta·out[i] + in[i]·keep(seed, offset + i) / (1 − p).
// keep(seed, j) = uniform24(lowbias32(j ^ lowbias32(seed))) ≥ p — the same function as
// ops/engine/src/reference/lora.rs, so backward redraws exactly the forward's mask from the seed.
// `offset` (mod 2³²) is the index of in[0] in the tensor the mask is drawn over: a slice of
// rows (one image of a batch) then draws exactly the mask a call on the whole tensor draws.
// The LoRA products themselves run on the matmul kernel (see ops/engine/src/gpu/kernels/lora.rs).

#include "lib/dispatch"

struct Params {
    n: u32,
    seed: u32,
    p: f32,
    beta: f32,
    inv_keep: f32, // 1 / (1 − p), computed on the host as the reference does
    offset: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

fn hash32(v: u32) -> u32 {
    var x = v;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

@compute @workgroup_size(256)
fn dropout(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 256u);
    if (i >= p.n) { return; }
    let u = f32(hash32((p.offset + i) ^ hash32(p.seed)) >> 8u) * (1.0 / 16777216.0);
    var v = 0.0;
    if (u >= p.p) { v = src[i] * p.inv_keep; }
    if (p.beta != 0.0) { v += p.beta * dst[i]; }
    dst[i] = v;
}
