//! Rotary position embedding (rotate-half), as transformers' default and linear rope types.

/// `inv_freq[i] = 1 / base^(2i / head_dim)` in f32 (as transformers computes it), divided by
/// the linear scaling `factor` (1.0 for none). Length head_dim / 2.
pub fn inv_freq(base: f32, head_dim: usize, factor: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / head_dim as f32;
            let f = 1.0f32 / (base as f64).powf(exponent as f64) as f32;
            f / factor
        })
        .collect()
}

/// cos/sin tables [n_pos, head_dim / 2]: angle = f32(pos) · inv_freq (an f32 product), then
/// cos/sin correctly rounded to f32.
pub fn cos_sin_tables(inv_freq: &[f32], n_pos: usize) -> (Vec<f32>, Vec<f32>) {
    let mut cos = Vec::with_capacity(n_pos * inv_freq.len());
    let mut sin = Vec::with_capacity(n_pos * inv_freq.len());
    for pos in 0..n_pos {
        for &f in inv_freq {
            let angle = pos as f32 * f;
            cos.push((angle as f64).cos() as f32);
            sin.push((angle as f64).sin() as f32);
        }
    }
    (cos, sin)
}

/// x: [tokens, heads, head_dim]; positions: [tokens]. Returns the rotated copy; `inverse`
/// rotates by the negative angle (the backward pass).
#[allow(clippy::too_many_arguments)]
pub fn rope(
    x: &[f32],
    positions: &[u32],
    cos: &[f32],
    sin: &[f32],
    heads: usize,
    head_dim: usize,
    inverse: bool,
) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = x.to_vec();
    for (t, &pos) in positions.iter().enumerate() {
        for h in 0..heads {
            let base = (t * heads + h) * head_dim;
            for i in 0..half {
                let c = cos[pos as usize * half + i] as f64;
                let s = sin[pos as usize * half + i] as f64 * if inverse { -1.0 } else { 1.0 };
                let a = x[base + i] as f64;
                let b = x[base + i + half] as f64;
                out[base + i] = (a * c - b * s) as f32;
                out[base + i + half] = (b * c + a * s) as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inv_freq_and_rotation_are_orthogonal() {
        let f = inv_freq(10000.0, 8, 1.0);
        assert_eq!(f[0], 1.0);
        assert!((f[1] - 0.1).abs() < 1e-7);
        let scaled = inv_freq(10000.0, 8, 8.0);
        assert_eq!(scaled[0], 0.125);
        let (c, s) = cos_sin_tables(&f, 5);
        let x: Vec<f32> = (0..16).map(|i| i as f32 * 0.1 - 0.7).collect();
        let y = rope(&x, &[3, 4], &c, &s, 1, 8, false);
        let back = rope(&y, &[3, 4], &c, &s, 1, 8, true);
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() < 1e-6);
        }
        // Rotation preserves each pair's norm.
        let n = |v: &[f32], i: usize| v[i] * v[i] + v[i + 4] * v[i + 4];
        assert!((n(&x, 1) - n(&y, 1)).abs() < 1e-5);
    }
}
