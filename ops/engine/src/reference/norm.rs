//! Gemma RMSNorm and LayerNorm over the last dimension (f64 inside, f32 out).
//! x, dy, y, dx: [rows, cols]; w, b, dw, db: [cols]; rstd, mean: [rows].

/// Gemma3RMSNorm: y = x · rsqrt(mean(x²) + eps) · (1 + w). Returns (y, rstd).
pub fn rmsnorm_forward(
    x: &[f32],
    w: &[f32],
    rows: usize,
    cols: usize,
    eps: f32,
) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0f32; rows * cols];
    let mut rstds = Vec::with_capacity(rows);
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64;
        let rstd = 1.0 / (ms + eps as f64).sqrt();
        for j in 0..cols {
            y[r * cols + j] = (row[j] as f64 * rstd * (1.0 + w[j] as f64)) as f32;
        }
        rstds.push(rstd as f32);
    }
    (y, rstds)
}

/// Returns (dx, dw) of [`rmsnorm_forward`].
/// `h = residual + rmsnorm(x; w_post)`, `y = rmsnorm(h; w_pre)` ([`rmsnorm_forward`] twice
/// around the residual add, the output rounded to f32 at each step as the GPU stores it).
pub fn rmsnorm_residual_rmsnorm(
    x: &[f32],
    residual: &[f32],
    w_post: &[f32],
    w_pre: &[f32],
    rows: usize,
    cols: usize,
    eps: f32,
) -> (Vec<f32>, Vec<f32>) {
    let (n, _) = rmsnorm_forward(x, w_post, rows, cols, eps);
    let h: Vec<f32> = n.iter().zip(residual).map(|(a, b)| a + b).collect();
    let (y, _) = rmsnorm_forward(&h, w_pre, rows, cols, eps);
    (h, y)
}

pub fn rmsnorm_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    rows: usize,
    cols: usize,
    eps: f32,
) -> (Vec<f32>, Vec<f32>) {
    let mut dx = vec![0f32; rows * cols];
    let mut dw = vec![0f64; cols];
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let g = &dy[r * cols..(r + 1) * cols];
        let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64;
        let rstd = 1.0 / (ms + eps as f64).sqrt();
        let mut mean_gx = 0.0;
        for j in 0..cols {
            mean_gx += g[j] as f64 * (1.0 + w[j] as f64) * row[j] as f64 * rstd;
            dw[j] += g[j] as f64 * row[j] as f64 * rstd;
        }
        mean_gx /= cols as f64;
        for j in 0..cols {
            let xhat = row[j] as f64 * rstd;
            dx[r * cols + j] = (rstd * (g[j] as f64 * (1.0 + w[j] as f64) - xhat * mean_gx)) as f32;
        }
    }
    (dx, dw.into_iter().map(|v| v as f32).collect())
}

/// torch LayerNorm (biased variance). Returns (y, mean, rstd).
pub fn layernorm_forward(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    rows: usize,
    cols: usize,
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut y = vec![0f32; rows * cols];
    let (mut means, mut rstds) = (Vec::new(), Vec::new());
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for j in 0..cols {
            y[r * cols + j] = ((row[j] as f64 - mean) * rstd * w[j] as f64 + b[j] as f64) as f32;
        }
        means.push(mean as f32);
        rstds.push(rstd as f32);
    }
    (y, means, rstds)
}

/// Returns (dx, dw, db) of [`layernorm_forward`].
pub fn layernorm_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    rows: usize,
    cols: usize,
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dx = vec![0f32; rows * cols];
    let mut dw = vec![0f64; cols];
    let mut db = vec![0f64; cols];
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let g = &dy[r * cols..(r + 1) * cols];
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        let (mut mg, mut mgx) = (0.0, 0.0);
        for j in 0..cols {
            let xhat = (row[j] as f64 - mean) * rstd;
            let gj = g[j] as f64 * w[j] as f64;
            mg += gj;
            mgx += gj * xhat;
            dw[j] += g[j] as f64 * xhat;
            db[j] += g[j] as f64;
        }
        mg /= cols as f64;
        mgx /= cols as f64;
        for j in 0..cols {
            let xhat = (row[j] as f64 - mean) * rstd;
            dx[r * cols + j] = (rstd * (g[j] as f64 * w[j] as f64 - mg - xhat * mgx)) as f32;
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    (dx, f(dw), f(db))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Backward against central finite differences of the forward (f64 inside, so tight).
    #[test]
    fn backward_matches_finite_differences() {
        let (rows, cols, eps) = (3, 5, 1e-6f32);
        let x: Vec<f32> = (0..15).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3).collect();
        let w: Vec<f32> = (0..5).map(|i| 0.1 * i as f32 - 0.2).collect();
        let b: Vec<f32> = (0..5).map(|i| 0.05 * i as f32).collect();
        let dy: Vec<f32> = (0..15).map(|i| ((i * 3 % 7) as f32 - 3.0) * 0.2).collect();
        let loss_rms = |x: &[f32], w: &[f32]| -> f64 {
            let (y, _) = rmsnorm_forward(x, w, rows, cols, eps);
            y.iter().zip(&dy).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let loss_ln = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
            let (y, _, _) = layernorm_forward(x, w, b, rows, cols, eps);
            y.iter().zip(&dy).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let (dx, dw) = rmsnorm_backward(&x, &w, &dy, rows, cols, eps);
        let (ldx, ldw, ldb) = layernorm_backward(&x, &w, &dy, rows, cols, eps);
        let h = 1e-2f32;
        for i in 0..15 {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            let num = (loss_rms(&xp, &w) - loss_rms(&xm, &w)) / (2.0 * h as f64);
            assert!(
                (num - dx[i] as f64).abs() < 2e-3,
                "rms dx[{i}] {num} vs {}",
                dx[i]
            );
            let num = (loss_ln(&xp, &w, &b) - loss_ln(&xm, &w, &b)) / (2.0 * h as f64);
            assert!(
                (num - ldx[i] as f64).abs() < 2e-3,
                "ln dx[{i}] {num} vs {}",
                ldx[i]
            );
        }
        for j in 0..5 {
            let (mut wp, mut wm) = (w.clone(), w.clone());
            wp[j] += h;
            wm[j] -= h;
            let num = (loss_rms(&x, &wp) - loss_rms(&x, &wm)) / (2.0 * h as f64);
            assert!((num - dw[j] as f64).abs() < 2e-3, "rms dw[{j}]");
            let num = (loss_ln(&x, &wp, &b) - loss_ln(&x, &wm, &b)) / (2.0 * h as f64);
            assert!((num - ldw[j] as f64).abs() < 2e-3, "ln dw[{j}]");
            let (mut bp, mut bm) = (b.clone(), b.clone());
            bp[j] += h;
            bm[j] -= h;
            let num = (loss_ln(&x, &w, &bp) - loss_ln(&x, &w, &bm)) / (2.0 * h as f64);
            assert!((num - ldb[j] as f64).abs() < 2e-3, "ln db[{j}]");
        }
    }
}
