//! GELU (tanh approximation, `gelu_pytorch_tanh`) and GeGLU `gelu(gate) · up`, in f64.

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const COEF: f64 = 0.044715;

pub fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + COEF * x * x * x)).tanh())) as f32
}

/// d gelu / dx.
pub fn gelu_grad(x: f32) -> f32 {
    let x = x as f64;
    let t = (SQRT_2_OVER_PI * (x + COEF * x * x * x)).tanh();
    (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * COEF * x * x)) as f32
}

pub fn gelu_forward(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| gelu(v)).collect()
}

pub fn gelu_backward(x: &[f32], dy: &[f32]) -> Vec<f32> {
    x.iter()
        .zip(dy)
        .map(|(&v, &d)| (d as f64 * gelu_grad(v) as f64) as f32)
        .collect()
}

pub fn geglu_forward(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| (gelu(g) as f64 * u as f64) as f32)
        .collect()
}

/// Returns (dgate, dup).
pub fn geglu_backward(gate: &[f32], up: &[f32], dout: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let dgate = (0..gate.len())
        .map(|i| (dout[i] as f64 * up[i] as f64 * gelu_grad(gate[i]) as f64) as f32)
        .collect();
    let dup = (0..gate.len())
        .map(|i| (dout[i] as f64 * gelu(gate[i]) as f64) as f32)
        .collect();
    (dgate, dup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_known_values_and_gradient() {
        // torch.nn.functional.gelu(x, approximate="tanh") at 1.0 and -2.0.
        assert!((gelu(1.0) - 0.841_191_96).abs() < 1e-6);
        assert!((gelu(-2.0) - -0.045_402_306).abs() < 1e-6);
        for &x in &[-3.0f32, -0.7, 0.0, 0.4, 2.5] {
            let h = 1e-3f64;
            let num = (gelu((x as f64 + h) as f32) as f64 - gelu((x as f64 - h) as f32) as f64)
                / (2.0 * h);
            assert!((num - gelu_grad(x) as f64).abs() < 1e-3, "{x}");
        }
    }
}
