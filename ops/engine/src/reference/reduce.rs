//! Reductions (f64 accumulation) and gradient clipping as torch's `clip_grad_norm_`.

pub fn sum(x: &[f32]) -> f32 {
    x.iter().map(|&v| v as f64).sum::<f64>() as f32
}

pub fn max(x: &[f32]) -> f32 {
    x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// sqrt of the sum of squares over every tensor (torch's total norm with norm_type 2).
pub fn global_l2_norm(tensors: &[&[f32]]) -> f32 {
    tensors
        .iter()
        .flat_map(|t| t.iter())
        .map(|&v| (v as f64).powi(2))
        .sum::<f64>()
        .sqrt() as f32
}

/// The factor `clip_grad_norm_` multiplies every gradient by: min(1, max_norm / (norm + 1e-6)).
pub fn clip_coefficient(norm: f32, max_norm: f32) -> f32 {
    (max_norm / (norm + 1e-6)).min(1.0)
}
