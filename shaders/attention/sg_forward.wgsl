// Bindings of the generated subgroup forward kernel (ops/engine/src/gpu/kernels/attention/codegen.rs).
#include "attention/sg_inputs"
@group(0) @binding(4) var<storage, read> MASK: array<i32>;
@group(0) @binding(5) var<storage, read_write> O: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> LSE: array<f32>;
