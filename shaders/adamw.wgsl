// AdamW in place, as torch.optim.AdamW (_single_tensor_adamw, maximize=False, amsgrad=False):
//   param *= 1 − lr·weight_decay
//   m = lerp(m, g, 1 − β1);  v = β2·v + (1 − β2)·g²
//   param −= step_size · m / (sqrt(v) / bias_correction2_sqrt + eps)
// step_size = lr / (1 − β1^t) and bias_correction2_sqrt = sqrt(1 − β2^t) are computed on the host
// in f64 (Python floats in torch) and passed as f32.

#include "lib/dispatch"
#include "lib/staging"

struct Params {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    decay_factor: f32, // 1 − lr·weight_decay
    step_size: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
    beta2: f32,
    one_minus_beta1: f32, // rounded from f64 on the host, as torch's Python-float scalars
    one_minus_beta2: f32,
    _pad3: f32,
}

@group(0) @binding(0) var<uniform> p: Params;

// The update of one element (torch's order of operations).
struct Moments { w: f32, m: f32, v: f32 }
fn update(param: f32, g: f32, m0: f32, v0: f32) -> Moments {
    let w = param * p.decay_factor;
    // torch's vectorised lerp with weight < 0.5: fma(weight, end − self, self)
    let m = fma(p.one_minus_beta1, g - m0, m0);
    let v = v0 * p.beta2 + p.one_minus_beta2 * g * g;
    let denom = sqrt(v) / p.bias_correction2_sqrt + p.eps;
    return Moments(w - p.step_size * (m / denom), m, v);
}

// `update` on four elements.
struct Moments4 { w: vec4<f32>, m: vec4<f32>, v: vec4<f32> }
fn update4(w: vec4<f32>, g: vec4<f32>, m: vec4<f32>, v: vec4<f32>) -> Moments4 {
    let r0 = update(w.x, g.x, m.x, v.x);
    let r1 = update(w.y, g.y, m.y, v.y);
    let r2 = update(w.z, g.z, m.z, v.z);
    let r3 = update(w.w, g.w, m.w, v.w);
    return Moments4(vec4<f32>(r0.w, r1.w, r2.w, r3.w), vec4<f32>(r0.m, r1.m, r2.m, r3.m),
                    vec4<f32>(r0.v, r1.v, r2.v, r3.v));
}

// Three kernels: `adamw` one element per invocation, `adamw4` (VEC4) four (vec4 views; n a
// multiple of 4): on lavapipe each storage access is a loop over the SIMD lanes, so a vec4
// access moves four elements for about the cost of one; `adamw4_tex` (VEC4 and TEXTURES) reads
// its inputs from staged linear textures.
#feature VEC4 four elements per invocation over vec4 views
#feature TEXTURES with VEC4: inputs read from staged linear textures
#feature BF16 parameter, gradient and moments stored as bf16 (two per u32 word), as torch keeps the state of bf16 parameters; the update in f32, each store rounded to nearest even (torch's fused AdamW)
#if BF16
@group(0) @binding(1) var<storage, read_write> param: array<u32>;
@group(0) @binding(2) var<storage, read> grad: array<u32>;
@group(0) @binding(3) var<storage, read_write> exp_avg: array<u32>;
@group(0) @binding(4) var<storage, read_write> exp_avg_sq: array<u32>;

#include "lib/bf16"

// One invocation per word (two elements); p.n counts elements and is even.
@compute @workgroup_size(256)
fn adamw_bf16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) l: u32) {
    let w = flat_invocation(wid, nwg, l, 256u);
    if (2u * w >= p.n) { return; }
    let pw = param[w];
    let gw = grad[w];
    let mw = exp_avg[w];
    let vw = exp_avg_sq[w];
    let a = update(bf16_lo(pw), bf16_lo(gw), bf16_lo(mw), bf16_lo(vw));
    let b = update(bf16_hi(pw), bf16_hi(gw), bf16_hi(mw), bf16_hi(vw));
    param[w] = bf16_pack(a.w, b.w);
    exp_avg[w] = bf16_pack(a.m, b.m);
    exp_avg_sq[w] = bf16_pack(a.v, b.v);
}

#elif !VEC4
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> exp_avg: array<f32>;
@group(0) @binding(4) var<storage, read_write> exp_avg_sq: array<f32>;

@compute @workgroup_size(256)
fn adamw(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 256u);
    if (i >= p.n) { return; }
    let r = update(param[i], grad[i], exp_avg[i], exp_avg_sq[i]);
    param[i] = r.w;
    exp_avg[i] = r.m;
    exp_avg_sq[i] = r.v;
}

#elif !TEXTURES
@group(0) @binding(1) var<storage, read_write> param: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> grad: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> exp_avg: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> exp_avg_sq: array<vec4<f32>>;

// p.n counts vec4s here.
@compute @workgroup_size(256)
fn adamw4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 256u);
    if (i >= p.n) { return; }
    let r = update4(param[i], grad[i], exp_avg[i], exp_avg_sq[i]);
    param[i] = r.w;
    exp_avg[i] = r.m;
    exp_avg_sq[i] = r.v;
}

#else
// adamw4 reading its inputs from linear texture copies (ops/engine/src/gpu/staging.rs: texel i at
// (i % 4096, i / 4096)) on CPU adapters, where a texel fetch costs a tenth of a storage load.
@group(0) @binding(1) var<storage, read_write> param: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> exp_avg: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> exp_avg_sq: array<vec4<f32>>;
@group(0) @binding(4) var param_t: texture_storage_2d<rgba32float, read>;
@group(0) @binding(5) var grad_t: texture_storage_2d<rgba32float, read>;
@group(0) @binding(6) var exp_avg_t: texture_storage_2d<rgba32float, read>;
@group(0) @binding(7) var exp_avg_sq_t: texture_storage_2d<rgba32float, read>;

@compute @workgroup_size(256)
fn adamw4_tex(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 256u);
    if (i >= p.n) { return; }
    let at = stage_texel(i);
    let r = update4(
        textureLoad(param_t, at),
        textureLoad(grad_t, at),
        textureLoad(exp_avg_t, at),
        textureLoad(exp_avg_sq_t, at),
    );
    param[i] = r.w;
    exp_avg[i] = r.m;
    exp_avg_sq[i] = r.v;
}
#endif
