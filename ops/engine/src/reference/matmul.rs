//! Matrix multiply reference (f64 accumulation).

/// Which operands are stored transposed and the epilogue.
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    /// A stored [K, M] instead of [M, K].
    pub trans_a: bool,
    /// B stored [N, K] instead of [K, N].
    pub trans_b: bool,
    pub alpha: f32,
    /// Multiplier of the old C (0: C is overwritten and never read).
    pub beta: f32,
}

impl Default for Gemm {
    fn default() -> Self {
        Gemm {
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            beta: 0.0,
        }
    }
}

/// C[M,N] = alpha · op(A) · op(B) + beta · C + bias[N] (bias broadcast over rows).
/// a: [M,K] or [K,M]; b: [K,N] or [N,K]; c: [M,N].
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    g: Gemm,
    bias: Option<&[f32]>,
) {
    assert_eq!(a.len(), m * k);
    assert_eq!(b.len(), k * n);
    assert_eq!(c.len(), m * n);
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for l in 0..k {
                let av = if g.trans_a {
                    a[l * m + i]
                } else {
                    a[i * k + l]
                };
                let bv = if g.trans_b {
                    b[j * k + l]
                } else {
                    b[l * n + j]
                };
                s += av as f64 * bv as f64;
            }
            let mut r = g.alpha as f64 * s;
            if g.beta != 0.0 {
                r += g.beta as f64 * c[i * n + j] as f64;
            }
            if let Some(bias) = bias {
                r += bias[j] as f64;
            }
            c[i * n + j] = r as f32;
        }
    }
}

/// Batched: a [batch, ...] (or one matrix broadcast when `a.len()` is one matrix), same for b;
/// c [batch, M, N].
#[allow(clippy::too_many_arguments)]
pub fn matmul_batched(
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    g: Gemm,
    bias: Option<&[f32]>,
) {
    let (sa, sb, sc) = (m * k, k * n, m * n);
    for z in 0..batch {
        let a_z = if a.len() == sa {
            a
        } else {
            &a[z * sa..(z + 1) * sa]
        };
        let b_z = if b.len() == sb {
            b
        } else {
            &b[z * sb..(z + 1) * sb]
        };
        matmul(a_z, b_z, &mut c[z * sc..(z + 1) * sc], m, n, k, g, bias);
    }
}
