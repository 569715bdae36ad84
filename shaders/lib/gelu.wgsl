// GELU with the tanh approximation (gelu_pytorch_tanh, Gemma's hidden_activation): shared by
// the activation kernels and the decode products that apply it as they store (GEGLU in
// matmul_rows_group), so both compute the same bits.

const SQRT_2_OVER_PI: f32 = 0.7978845608028654;
const COEF: f32 = 0.044715;

fn gelu(x: f32) -> f32 {
    let inner = SQRT_2_OVER_PI * (x + COEF * x * x * x);
    return 0.5 * x * (1.0 + tanh(inner));
}
