// dO, the statistics and the mask of the generated subgroup backward kernels (dQ; dK and dV).
#include "attention/sg_inputs"
#if TEXTURES
@group(0) @binding(4) var DO: texture_storage_2d<rgba32float, read>;
fn ld_do(i: u32) -> vec4<f32> { return textureLoad(DO, stage_texel(i)); }
#else
@group(0) @binding(4) var<storage, read> DO: array<vec4<f32>>;
fn ld_do(i: u32) -> vec4<f32> { return DO[i]; }
#endif
@group(0) @binding(5) var<storage, read> STATS: array<vec2<f32>>;
@group(0) @binding(6) var<storage, read> MASK: array<i32>;
