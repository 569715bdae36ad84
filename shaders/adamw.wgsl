// AdamW in place, as torch.optim.AdamW (_single_tensor_adamw, maximize=False, amsgrad=False):
//   param *= 1 − lr·weight_decay
//   m = lerp(m, g, 1 − β1);  v = β2·v + (1 − β2)·g²
//   param −= step_size · m / (sqrt(v) / bias_correction2_sqrt + eps)
// step_size = lr / (1 − β1^t) and bias_correction2_sqrt = sqrt(1 − β2^t) are computed on the host
// in f64 (Python floats in torch) and passed as f32.

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
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> exp_avg: array<f32>;
@group(0) @binding(4) var<storage, read_write> exp_avg_sq: array<f32>;

@compute @workgroup_size(256)
fn adamw(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) l: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + l;
    if (i >= p.n) { return; }
    let g = grad[i];
    let w = param[i] * p.decay_factor;
    // torch's vectorised lerp with weight < 0.5: fma(weight, end − self, self)
    let m = fma(p.one_minus_beta1, g - exp_avg[i], exp_avg[i]);
    let v = exp_avg_sq[i] * p.beta2 + p.one_minus_beta2 * g * g;
    let denom = sqrt(v) / p.bias_correction2_sqrt + p.eps;
    param[i] = w - p.step_size * (m / denom);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
}
