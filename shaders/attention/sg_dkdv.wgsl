// Bindings of the generated subgroup dK/dV kernel (ops/engine/src/gpu/kernels/attention/codegen.rs).
#include "attention/sg_backward"
@group(0) @binding(7) var<storage, read_write> DK: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> DV: array<vec4<f32>>;
