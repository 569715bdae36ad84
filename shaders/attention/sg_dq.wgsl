// Bindings of the generated subgroup dQ kernel (ops/engine/src/gpu/kernels/attention/codegen.rs).
#include "attention/sg_backward"
@group(0) @binding(7) var<storage, read_write> DQ: array<vec4<f32>>;
