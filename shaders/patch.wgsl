// SigLIP patch unfold: PIXELS [images, channels, size, size] -> PATCHES [images*side*side,
// channels*patch*patch], row = image*side² + pr*side + pc, columns in (channel, kh, kw) order
// (the conv weight's order, so the stride-`patch` conv is PATCHES · Wᵀ).
// Reference: ops/engine/src/reference/patch.rs. One invocation per output element.

#include "lib/dispatch"

struct Params {
    n: u32,
    channels: u32,
    size: u32,
    patch_size: u32,
    side: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> PIXELS: array<f32>;
@group(0) @binding(2) var<storage, read_write> PATCHES: array<f32>;

@compute @workgroup_size(256)
fn patch_unfold(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 256u);
    if (i >= p.n) { return; }
    let area = p.patch_size * p.patch_size;
    let patch_dim = p.channels * area;
    let row = i / patch_dim;
    let col = i % patch_dim;
    let per_image = p.side * p.side;
    let image = row / per_image;
    let cell = row % per_image;
    let y = (cell / p.side) * p.patch_size + (col % area) / p.patch_size;
    let x = (cell % p.side) * p.patch_size + col % p.patch_size;
    let c = col / area;
    PATCHES[i] = PIXELS[((image * p.channels + c) * p.size + y) * p.size + x];
}
