// GELU with the tanh approximation (gelu_pytorch_tanh) and the gated GeGLU product
// out = gelu(gate) · up (Gemma's MLP), forward and backward. Elementwise over n values.

#include "lib/dispatch"
#include "lib/gelu"

struct Params {
    n: u32,
    accumulate: u32, // backward: 1 adds into the gradients instead of overwriting
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

#feature VEC4 the forward kernels four elements per invocation over vec4 views, p.n counting vec4s (on lavapipe a storage access is a loop over the SIMD lanes, so a vec4 moves four elements for about the cost of one)
#feature TEXTURES with VEC4: the inputs read from staged linear textures (ops/engine/src/gpu/staging.rs)

// The VEC4 kernels' GELU of four values (lib/gelu's, component by component).
fn gelu4(v: vec4<f32>) -> vec4<f32> { return vec4<f32>(gelu(v.x), gelu(v.y), gelu(v.z), gelu(v.w)); }

#if !VEC4
fn gelu_grad(x: f32) -> f32 {
    let inner = SQRT_2_OVER_PI * (x + COEF * x * x * x);
    let t = tanh(inner);
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * COEF * x * x);
}

@group(0) @binding(1) var<storage, read> in_a: array<f32>;
@group(0) @binding(2) var<storage, read_write> out_a: array<f32>;

@compute @workgroup_size(256)
fn gelu_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 256u);
    if (i >= p.n) { return; }
    out_a[i] = gelu(in_a[i]);
}

// gelu_backward: in_a = x, in_b = dy, out_a = dx
@group(0) @binding(3) var<storage, read> in_b: array<f32>;

@compute @workgroup_size(256)
fn gelu_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 256u);
    if (i >= p.n) { return; }
    var g = in_b[i] * gelu_grad(in_a[i]);
    if (p.accumulate != 0u) { g += out_a[i]; }
    out_a[i] = g;
}

// geglu_forward: in_a = gate, in_b = up, out_a = gelu(gate) · up
@compute @workgroup_size(256)
fn geglu_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 256u);
    if (i >= p.n) { return; }
    out_a[i] = gelu(in_a[i]) * in_b[i];
}

// geglu_backward: in_a = gate, in_b = up, in_c = dout -> out_a = dgate, out_b = dup
@group(0) @binding(4) var<storage, read> in_c: array<f32>;
@group(0) @binding(5) var<storage, read_write> out_b: array<f32>;

@compute @workgroup_size(256)
fn geglu_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 256u);
    if (i >= p.n) { return; }
    let gate = in_a[i];
    let d = in_c[i];
    var dgate = d * in_b[i] * gelu_grad(gate);
    var dup = d * gelu(gate);
    if (p.accumulate != 0u) { dgate += out_a[i]; dup += out_b[i]; }
    out_a[i] = dgate;
    out_b[i] = dup;
}

#elif !TEXTURES
@group(0) @binding(1) var<storage, read> in_a4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> out_a4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> in_b4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn gelu_forward4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 256u);
    if (i >= p.n) { return; }
    out_a4[i] = gelu4(in_a4[i]);
}

@compute @workgroup_size(256)
fn geglu_forward4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 256u);
    if (i >= p.n) { return; }
    out_a4[i] = gelu4(in_a4[i]) * in_b4[i];
}

#else
#include "lib/staging"
@group(0) @binding(1) var<storage, read_write> out_a4: array<vec4<f32>>;
@group(0) @binding(2) var in_a_t: texture_storage_2d<rgba32float, read>;
@group(0) @binding(3) var in_b_t: texture_storage_2d<rgba32float, read>;

@compute @workgroup_size(256)
fn gelu_forward4_tex(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 256u);
    if (i >= p.n) { return; }
    out_a4[i] = gelu4(textureLoad(in_a_t, stage_texel(i)));
}

@compute @workgroup_size(256)
fn geglu_forward4_tex(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 256u);
    if (i >= p.n) { return; }
    let at = stage_texel(i);
    out_a4[i] = gelu4(textureLoad(in_a_t, at)) * textureLoad(in_b_t, at);
}
#endif
