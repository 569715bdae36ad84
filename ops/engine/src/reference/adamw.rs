//! torch.optim.AdamW (single-tensor path, amsgrad off), f32 state, in place.

pub use crate::shapes::{AdamWScalars, AdamWStep};

/// One step on param/exp_avg/exp_avg_sq in place, with f32 arithmetic in torch's order.
pub fn adamw_step(
    param: &mut [f32],
    grad: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    s: &AdamWStep,
) {
    let c = s.scalars();
    for i in 0..param.len() {
        let g = grad[i];
        let w = param[i] * c.decay_factor;
        // torch's vectorised lerp with weight < 0.5: fma(weight, end − self, self)
        let m = c.one_minus_beta1.mul_add(g - exp_avg[i], exp_avg[i]);
        // addcmul: self + value · g · g
        let v = exp_avg_sq[i] * c.beta2 + c.one_minus_beta2 * g * g;
        let denom = v.sqrt() / c.bias_correction2_sqrt + c.eps;
        param[i] = w - c.step_size * (m / denom);
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
    }
}

/// [`adamw_step`] on bf16 state (values given widened to f32): the update in f32, then the
/// parameter and both moments rounded to bf16, as torch's fused AdamW stores a bf16
/// parameter's state.
pub fn adamw_step_bf16(
    param: &mut [f32],
    grad: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    s: &AdamWStep,
) {
    adamw_step(param, grad, exp_avg, exp_avg_sq, s);
    for t in [param, exp_avg, exp_avg_sq] {
        crate::reference::cast::round_to_bf16(t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torch 2.x `torch.optim.AdamW(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
    /// foreach=False)`, three steps on a 5-element parameter (values as f32 bits).
    #[test]
    fn three_steps_match_torch_within_an_ulp_or_two() {
        let mut p = vec![0.5f32, -1.2, 2.0, 0.0, 3e-4];
        let grads = [
            [0.1f32, -0.3, 2.0, 1e-5, -4.0],
            [0.2, 0.3, -1.0, 0.0, 0.5],
            [-0.05, 0.01, 0.7, 1e-3, 3.0],
        ];
        let (mut m, mut v) = (vec![0f32; 5], vec![0f32; 5]);
        for (t, g) in grads.iter().enumerate() {
            let s = AdamWStep {
                lr: 2e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
                step: t as u64 + 1,
            };
            adamw_step(&mut p, g, &mut m, &mut v, &s);
        }
        let torch_p = [
            0x3efd5e9eu32,
            0xbf995ccf,
            0x3fff8fae,
            0xbb9784fe,
            0x3b5e4442,
        ];
        let torch_m = [
            0x3cacd9e9u32,
            0x3b727bb6,
            0x3e116873,
            0x38d369f6,
            0x3cac082f,
        ];
        let torch_v = [
            0x385bf309u32,
            0x393c90c7,
            0x3bb399ff,
            0x308973e4,
            0x3cce957e,
        ];
        for (name, ours, theirs) in [
            ("param", &p, &torch_p),
            ("exp_avg", &m, &torch_m),
            ("exp_avg_sq", &v, &torch_v),
        ] {
            for (i, (&o, &t)) in ours.iter().zip(theirs.iter()).enumerate() {
                let ulps = (o.to_bits() as i64 - t as i64).abs();
                assert!(
                    ulps <= 2,
                    "{name}[{i}]: ours {o} torch {} ({ulps} ulps)",
                    f32::from_bits(t)
                );
            }
        }
    }
}
