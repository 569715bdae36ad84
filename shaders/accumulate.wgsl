// In-place accumulation acc += addend with the addend repeating: residual connections (addend
// of acc's shape) and the SigLIP position embedding ([patches, hidden] over [images*patches, hidden]).
// Reference: ops/engine/src/reference/accumulate.rs. One dispatch per storage chunk of acc: element i of
// the chunk adds ADDEND[(offset + i) % period], offset = the chunk's first element modulo period.

#include "lib/dispatch"

struct Params {
    n: u32,
    offset: u32,
    period: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
#feature VEC4 four elements per invocation over vec4 views: a same-shape addend, p.n counting vec4s (on lavapipe a storage access is a loop over the SIMD lanes, so a vec4 moves four elements for about the cost of one)
#feature TEXTURES with VEC4: both operands read from staged linear textures (ops/engine/src/gpu/staging.rs)

#if !VEC4
@group(0) @binding(1) var<storage, read_write> ACC: array<f32>;
@group(0) @binding(2) var<storage, read> ADDEND: array<f32>;

@compute @workgroup_size(256)
fn accumulate(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 256u);
    if (i >= p.n) { return; }
    ACC[i] = ACC[i] + ADDEND[(p.offset + i) % p.period];
}

#elif !TEXTURES
@group(0) @binding(1) var<storage, read_write> ACC4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> ADDEND4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn accumulate4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 256u);
    if (i >= p.n) { return; }
    ACC4[i] = ACC4[i] + ADDEND4[i];
}

#else
#include "lib/staging"
@group(0) @binding(1) var<storage, read_write> ACC4: array<vec4<f32>>;
@group(0) @binding(2) var acc_t: texture_storage_2d<rgba32float, read>;
@group(0) @binding(3) var addend_t: texture_storage_2d<rgba32float, read>;

@compute @workgroup_size(256)
fn accumulate4_tex(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 256u);
    if (i >= p.n) { return; }
    let at = stage_texel(i);
    ACC4[i] = textureLoad(acc_t, at) + textureLoad(addend_t, at);
}
#endif
