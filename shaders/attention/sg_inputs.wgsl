// Q, K and V of the generated subgroup kernels for 8-lane CPU adapters (lavapipe), whose entry
// points are written, fully unrolled, by ops/engine/src/gpu/kernels/attention/codegen.rs (`subgroup_forward`
// etc., which document them). They read through ld_q, ld_k, ld_v: from storage buffers, or
// with TEXTURES from staged linear textures, where lavapipe fetches ten times faster than it
// loads storage.
#feature TEXTURES Q, K, V (and dO) read from staged linear textures (ops/engine/src/gpu/staging.rs)
#include "attention/common"
#if TEXTURES
#include "lib/staging"
@group(0) @binding(1) var Q: texture_storage_2d<rgba32float, read>;
fn ld_q(i: u32) -> vec4<f32> { return textureLoad(Q, stage_texel(i)); }
@group(0) @binding(2) var K: texture_storage_2d<rgba32float, read>;
fn ld_k(i: u32) -> vec4<f32> { return textureLoad(K, stage_texel(i)); }
@group(0) @binding(3) var V: texture_storage_2d<rgba32float, read>;
fn ld_v(i: u32) -> vec4<f32> { return textureLoad(V, stage_texel(i)); }
#else
@group(0) @binding(1) var<storage, read> Q: array<vec4<f32>>;
fn ld_q(i: u32) -> vec4<f32> { return Q[i]; }
@group(0) @binding(2) var<storage, read> K: array<vec4<f32>>;
fn ld_k(i: u32) -> vec4<f32> { return K[i]; }
@group(0) @binding(3) var<storage, read> V: array<vec4<f32>>;
fn ld_v(i: u32) -> vec4<f32> { return V[i]; }
#endif
