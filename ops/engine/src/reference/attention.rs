//! Scaled dot-product attention with Gemma 3 / SigLIP masks: the truth the flash-style WGSL kernels
//! (`shaders/attention/`) are tested against.
//!
//! Layout: q, out, d_out, dq are `[batch, seq, q_heads, head_dim]` and k, v, dk, dv are
//! `[batch, seq, kv_heads, head_dim]` — exactly the row-major output of the q/k/v projections
//! (`[batch * seq, heads * head_dim]`), so no transpose is needed around attention.
//! The logsumexp saved by the forward pass is `[batch, q_heads, seq]`.
//!
//! Mask (transformers >= 4.53 `create_causal_mask` + `token_type_ids_mask_function`):
//! `allowed(q, kv) = ((causal: kv <= q [and sliding: kv > q - window]) or same_image(q, kv))
//!                   and key_padding[kv] == 1`; without `causal` every key is a candidate (SigLIP).
//! `same_image` holds when both tokens are image tokens of the same maximal contiguous run.
//!
//! Fully masked query rows (possible only with left padding or a padded non-causal batch): the
//! output row is 0, its logsumexp is +inf, and it receives and passes on no gradient. Such rows are
//! padding, whose outputs never reach an unpadded token or a counted label.
//!
//! Grouped-query attention: kv head `j` serves q heads `j*g .. j*g+g-1`, `g = q_heads / kv_heads`.
//! All arithmetic here is f64; the f32 entry points only convert.

pub use crate::shapes::{AttentionDims, AttentionMask};
use anyhow::{bail, ensure, Result};

/// Numbers each maximal contiguous run of image tokens (`token_type_ids == 1`) of a sample 0, 1, 2, ...
/// and gives text tokens -1, as transformers' `image_group_ids`. `token_type_ids`: `[batch, seq]`.
pub fn image_group_ids(token_type_ids: &[u32], batch: usize, seq: usize) -> Result<Vec<i32>> {
    ensure!(
        token_type_ids.len() == batch * seq,
        "token_type_ids has {} entries, expected {batch}*{seq}",
        token_type_ids.len()
    );
    let mut groups = vec![-1i32; batch * seq];
    for b in 0..batch {
        let mut next_group = 0;
        for t in 0..seq {
            match token_type_ids[b * seq + t] {
                0 => {}
                1 => {
                    let continues = t > 0 && token_type_ids[b * seq + t - 1] == 1;
                    if !continues {
                        next_group += 1;
                    }
                    groups[b * seq + t] = next_group - 1;
                }
                other => bail!(
                    "token_type_ids[{b}][{t}] is {other}; only 0 (text) and 1 (image) are known"
                ),
            }
        }
    }
    Ok(groups)
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn narrow(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

fn check_len(name: &str, got: usize, want: usize) -> Result<()> {
    ensure!(got == want, "{name} has {got} elements, expected {want}");
    Ok(())
}

/// Forward pass. Returns `(out [batch, seq, q_heads, head_dim], logsumexp [batch, q_heads, seq])`;
/// the logsumexp is of the scaled, masked scores (+inf for a fully masked row).
pub fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: &AttentionDims,
    mask: &AttentionMask,
    scale: f32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (out, lse) =
        attention_forward_f64(&widen(q), &widen(k), &widen(v), dims, mask, scale as f64)?;
    Ok((narrow(&out), narrow(&lse)))
}

/// [`attention_forward`] in f64 (used directly by the finite-difference tests).
pub fn attention_forward_f64(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dims: &AttentionDims,
    mask: &AttentionMask,
    scale: f64,
) -> Result<(Vec<f64>, Vec<f64>)> {
    dims.validate()?;
    mask.validate(dims)?;
    check_len("q", q.len(), dims.q_len())?;
    check_len("k", k.len(), dims.kv_len())?;
    check_len("v", v.len(), dims.kv_len())?;
    let AttentionDims {
        batch,
        seq,
        q_heads,
        kv_heads,
        head_dim,
    } = *dims;
    let q_at = |b: usize, t: usize, h: usize| ((b * seq + t) * q_heads + h) * head_dim;
    let kv_at = |b: usize, t: usize, h: usize| ((b * seq + t) * kv_heads + h) * head_dim;
    let mut out = vec![0.0; dims.q_len()];
    let mut lse = vec![f64::INFINITY; dims.lse_len()];
    let mut scores = vec![0.0; seq];
    for b in 0..batch {
        for h in 0..q_heads {
            let kvh = h / dims.group();
            for i in 0..seq {
                let qi = &q[q_at(b, i, h)..][..head_dim];
                let mut max = f64::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    *s = if mask.allows(seq, b, i, j) {
                        let kj = &k[kv_at(b, j, kvh)..][..head_dim];
                        scale * qi.iter().zip(kj).map(|(a, c)| a * c).sum::<f64>()
                    } else {
                        f64::NEG_INFINITY
                    };
                    max = max.max(*s);
                }
                if max == f64::NEG_INFINITY {
                    continue; // fully masked row: zero output, lse stays +inf
                }
                let denom: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                let row_lse = max + denom.ln();
                lse[(b * q_heads + h) * seq + i] = row_lse;
                let oi = &mut out[q_at(b, i, h)..][..head_dim];
                for (j, s) in scores.iter().enumerate() {
                    if *s == f64::NEG_INFINITY {
                        continue;
                    }
                    let p = (s - row_lse).exp();
                    let vj = &v[kv_at(b, j, kvh)..][..head_dim];
                    for (o, x) in oi.iter_mut().zip(vj) {
                        *o += p * x;
                    }
                }
            }
        }
    }
    Ok((out, lse))
}

/// Gradients of attention. Returns `(dq, dk, dv)` shaped like `(q, k, v)`. `out` and `lse` are the
/// forward's outputs; the probabilities are recomputed from `lse` as the GPU backward does.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    d_out: &[f32],
    dims: &AttentionDims,
    mask: &AttentionMask,
    scale: f32,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (dq, dk, dv) = attention_backward_f64(
        &widen(q),
        &widen(k),
        &widen(v),
        &widen(out),
        &widen(lse),
        &widen(d_out),
        dims,
        mask,
        scale as f64,
    )?;
    Ok((narrow(&dq), narrow(&dk), narrow(&dv)))
}

/// [`attention_backward`] in f64.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_f64(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    out: &[f64],
    lse: &[f64],
    d_out: &[f64],
    dims: &AttentionDims,
    mask: &AttentionMask,
    scale: f64,
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    dims.validate()?;
    mask.validate(dims)?;
    check_len("q", q.len(), dims.q_len())?;
    check_len("k", k.len(), dims.kv_len())?;
    check_len("v", v.len(), dims.kv_len())?;
    check_len("out", out.len(), dims.q_len())?;
    check_len("d_out", d_out.len(), dims.q_len())?;
    check_len("lse", lse.len(), dims.lse_len())?;
    let AttentionDims {
        batch,
        seq,
        q_heads,
        kv_heads,
        head_dim,
    } = *dims;
    let q_at = |b: usize, t: usize, h: usize| ((b * seq + t) * q_heads + h) * head_dim;
    let kv_at = |b: usize, t: usize, h: usize| ((b * seq + t) * kv_heads + h) * head_dim;
    let dot = |a: &[f64], c: &[f64]| a.iter().zip(c).map(|(x, y)| x * y).sum::<f64>();
    let mut dq = vec![0.0; dims.q_len()];
    let mut dk = vec![0.0; dims.kv_len()];
    let mut dv = vec![0.0; dims.kv_len()];
    for b in 0..batch {
        for h in 0..q_heads {
            let kvh = h / dims.group();
            for i in 0..seq {
                let row_lse = lse[(b * q_heads + h) * seq + i];
                if row_lse == f64::INFINITY {
                    continue;
                }
                let qi = &q[q_at(b, i, h)..][..head_dim];
                let doi = &d_out[q_at(b, i, h)..][..head_dim];
                // d(softmax): dS_ij = P_ij * (dP_ij - sum_j P_ij dP_ij), and sum_j P_ij dP_ij = dO_i . O_i.
                let row_delta = dot(doi, &out[q_at(b, i, h)..][..head_dim]);
                for j in 0..seq {
                    if !mask.allows(seq, b, i, j) {
                        continue;
                    }
                    let kj_at = kv_at(b, j, kvh);
                    let p = (scale * dot(qi, &k[kj_at..][..head_dim]) - row_lse).exp();
                    let dp = dot(doi, &v[kj_at..][..head_dim]);
                    let ds = p * (dp - row_delta) * scale;
                    for d in 0..head_dim {
                        dv[kj_at + d] += p * doi[d];
                        dq[q_at(b, i, h) + d] += ds * k[kj_at + d];
                        dk[kj_at + d] += ds * qi[d];
                    }
                }
            }
        }
    }
    Ok((dq, dk, dv))
}

/// transformers' eager attention adds `finfo(f32).min` to blocked scores, so a query that may see
/// no key at all (a right-padding token further than the sliding window from the last real
/// token) gets equal scores everywhere and averages `v` over the whole sequence. The attention
/// reference leaves such rows 0 (lse +inf); this writes the eager value so the padded positions'
/// hidden states match transformers too. Those rows never reach a counted label or an unpadded
/// token (padding keys are masked), so the backward needs nothing for them.
/// `attn [batch, seq, heads, head_dim]`, `v [batch, seq, kv_heads, head_dim]`, `lse [batch, heads, seq]`.
pub fn eager_fully_masked_rows(attn: &mut [f32], v: &[f32], lse: &[f32], d: &AttentionDims) {
    let (seq, hd) = (d.seq, d.head_dim);
    for b in 0..d.batch {
        for h in 0..d.q_heads {
            let kvh = h / d.group();
            for i in 0..seq {
                if lse[(b * d.q_heads + h) * seq + i] != f32::INFINITY {
                    continue;
                }
                let mut mean = vec![0.0f64; hd];
                for j in 0..seq {
                    let vj = &v[((b * seq + j) * d.kv_heads + kvh) * hd..][..hd];
                    mean.iter_mut().zip(vj).for_each(|(m, &x)| *m += x as f64);
                }
                let out = &mut attn[((b * seq + i) * d.q_heads + h) * hd..][..hd];
                for (o, m) in out.iter_mut().zip(mean) {
                    *o = (m / seq as f64) as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::testing::rel_frobenius;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    fn fresh_rng() -> (StdRng, u64) {
        let seed: u64 = rand::random();
        (StdRng::seed_from_u64(seed), seed)
    }

    fn random_vec(rng: &mut StdRng, n: usize) -> Vec<f64> {
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// The mask as transformers builds it: boolean [seq, seq] matrices per sample, composed.
    fn mask_matrix(
        seq: usize,
        causal: bool,
        window: Option<usize>,
        token_types: Option<&[u32]>,
        padding: Option<&[u32]>,
    ) -> Vec<Vec<bool>> {
        let mut m = vec![vec![!causal; seq]; seq];
        if causal {
            for (i, row) in m.iter_mut().enumerate() {
                for (j, cell) in row.iter_mut().enumerate() {
                    // tril, and for sliding layers the band above tril(diagonal = -window)
                    *cell = j <= i && window.is_none_or(|w| (i as i64 - j as i64) < w as i64);
                }
            }
        }
        if let Some(tt) = token_types {
            // Group ids as transformers computes them: cumsum of run starts, minus one, text -> -1.
            let starts: Vec<i64> = (0..seq)
                .map(|t| (tt[t] == 1 && (t == 0 || tt[t - 1] != 1)) as i64)
                .collect();
            let mut acc = 0;
            let groups: Vec<i64> = (0..seq)
                .map(|t| {
                    acc += starts[t];
                    if tt[t] == 1 {
                        acc - 1
                    } else {
                        -1
                    }
                })
                .collect();
            for i in 0..seq {
                for j in 0..seq {
                    if tt[i] == 1 && tt[j] == 1 && groups[i] == groups[j] {
                        m[i][j] = true;
                    }
                }
            }
        }
        if let Some(pad) = padding {
            for row in m.iter_mut() {
                for (j, cell) in row.iter_mut().enumerate() {
                    *cell &= pad[j] == 1;
                }
            }
        }
        m
    }

    /// Materialised scores + softmax for one sample and head, straight from the definition.
    fn naive_head(
        q: &[Vec<f64>],
        k: &[Vec<f64>],
        v: &[Vec<f64>],
        mask: &[Vec<bool>],
        scale: f64,
    ) -> Vec<Vec<f64>> {
        let seq = q.len();
        (0..seq)
            .map(|i| {
                let scores: Vec<Option<f64>> = (0..seq)
                    .map(|j| {
                        mask[i][j].then(|| {
                            scale * q[i].iter().zip(&k[j]).map(|(a, b)| a * b).sum::<f64>()
                        })
                    })
                    .collect();
                let visible: Vec<f64> = scores.iter().flatten().copied().collect();
                let mut row = vec![0.0; v[0].len()];
                if visible.is_empty() {
                    return row;
                }
                let max = visible.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = visible.iter().map(|s| (s - max).exp()).sum();
                for (j, s) in scores.iter().enumerate() {
                    if let Some(s) = s {
                        let p = (s - max).exp() / z;
                        for (o, x) in row.iter_mut().zip(&v[j]) {
                            *o += p * x;
                        }
                    }
                }
                row
            })
            .collect()
    }

    struct Case {
        dims: AttentionDims,
        causal: bool,
        window: Option<usize>,
        token_types: Option<Vec<u32>>,
        padding: Option<Vec<u32>>,
    }

    /// token_type_ids with two images per sample (so per-image grouping matters) at random places.
    fn random_token_types(rng: &mut StdRng, batch: usize, seq: usize) -> Vec<u32> {
        let mut tt = vec![0u32; batch * seq];
        for b in 0..batch {
            let a = rng.random_range(0..seq / 2);
            let len_a = rng.random_range(1..=seq / 4);
            let gap = rng.random_range(0..3);
            let c = (a + len_a + gap).min(seq - 1);
            let len_c = rng.random_range(1..=seq / 4);
            for t in a..(a + len_a).min(seq) {
                tt[b * seq + t] = 1;
            }
            for t in c..(c + len_c).min(seq) {
                tt[b * seq + t] = 1;
            }
        }
        tt
    }

    fn random_padding(rng: &mut StdRng, batch: usize, seq: usize, left: bool) -> Vec<u32> {
        let mut pad = vec![1u32; batch * seq];
        for b in 1..batch {
            let n = rng.random_range(1..seq / 2);
            for t in 0..n {
                let pos = if left { t } else { seq - 1 - t };
                pad[b * seq + pos] = 0;
            }
        }
        pad
    }

    fn cases(rng: &mut StdRng) -> Vec<Case> {
        let text = AttentionDims {
            batch: 3,
            seq: 19,
            q_heads: 4,
            kv_heads: 2,
            head_dim: 5,
        };
        let vision = AttentionDims {
            batch: 2,
            seq: 13,
            q_heads: 3,
            kv_heads: 3,
            head_dim: 7,
        };
        vec![
            Case {
                dims: text,
                causal: true,
                window: None,
                token_types: None,
                padding: None,
            },
            Case {
                dims: text,
                causal: true,
                window: Some(4),
                token_types: None,
                padding: None,
            },
            Case {
                dims: text,
                causal: true,
                window: None,
                token_types: Some(random_token_types(rng, 3, 19)),
                padding: Some(random_padding(rng, 3, 19, false)),
            },
            Case {
                dims: text,
                causal: true,
                window: Some(3),
                token_types: Some(random_token_types(rng, 3, 19)),
                padding: Some(random_padding(rng, 3, 19, true)),
            },
            Case {
                dims: vision,
                causal: false,
                window: None,
                token_types: None,
                padding: None,
            },
            Case {
                dims: vision,
                causal: false,
                window: None,
                token_types: None,
                padding: Some(random_padding(rng, 2, 13, false)),
            },
        ]
    }

    #[test]
    fn forward_matches_materialised_softmax_with_explicit_mask() {
        let (mut rng, seed) = fresh_rng();
        for case in cases(&mut rng) {
            let d = case.dims;
            let (q, k, v) = (
                random_vec(&mut rng, d.q_len()),
                random_vec(&mut rng, d.kv_len()),
                random_vec(&mut rng, d.kv_len()),
            );
            let groups = case
                .token_types
                .as_ref()
                .map(|tt| image_group_ids(tt, d.batch, d.seq).unwrap());
            let mask = AttentionMask {
                causal: case.causal,
                sliding_window: case.window,
                image_groups: groups.as_deref(),
                key_padding: case.padding.as_deref(),
            };
            let scale = 0.37;
            let (out, lse) = attention_forward_f64(&q, &k, &v, &d, &mask, scale).unwrap();
            let mut want = vec![0.0; d.q_len()];
            let mut fully_masked_rows = 0;
            for b in 0..d.batch {
                let tt = case.token_types.as_ref().map(|t| &t[b * d.seq..][..d.seq]);
                let pad = case.padding.as_ref().map(|p| &p[b * d.seq..][..d.seq]);
                let m = mask_matrix(d.seq, case.causal, case.window, tt, pad);
                for h in 0..d.q_heads {
                    let kvh = h / d.group();
                    let rows = |x: &[f64], heads: usize, hh: usize| -> Vec<Vec<f64>> {
                        (0..d.seq)
                            .map(|t| {
                                x[((b * d.seq + t) * heads + hh) * d.head_dim..][..d.head_dim]
                                    .to_vec()
                            })
                            .collect()
                    };
                    let o = naive_head(
                        &rows(&q, d.q_heads, h),
                        &rows(&k, d.kv_heads, kvh),
                        &rows(&v, d.kv_heads, kvh),
                        &m,
                        scale,
                    );
                    for (t, row) in o.iter().enumerate() {
                        want[((b * d.seq + t) * d.q_heads + h) * d.head_dim..][..d.head_dim]
                            .copy_from_slice(row);
                        let row_lse = lse[(b * d.q_heads + h) * d.seq + t];
                        let masked = m[t].iter().all(|x| !x);
                        assert_eq!(
                            masked,
                            row_lse == f64::INFINITY,
                            "seed {seed}: lse of row {t} is {row_lse}"
                        );
                        fully_masked_rows += masked as usize;
                    }
                }
            }
            let err = rel_frobenius(&out, &want);
            assert!(
                err < 1e-12,
                "seed {seed}: {d:?} causal {} window {:?}: rel error {err}",
                case.causal,
                case.window
            );
            if case.padding.is_some() && case.causal && case.window.is_some() {
                // left padding: the first query rows of padded samples see nothing at all
                assert!(
                    fully_masked_rows > 0,
                    "seed {seed}: the left-padded case should exercise fully masked rows"
                );
            }
        }
    }

    #[test]
    fn image_groups_number_runs_per_sample() {
        let tt = [
            0, 1, 1, 0, 1, 0, 0, 1, 1, 1, /* sample 2 */ 1, 1, 0, 0, 0, 0, 0, 0, 1, 1,
        ];
        let g = image_group_ids(&tt, 2, 10).unwrap();
        assert_eq!(
            g,
            [-1, 0, 0, -1, 1, -1, -1, 2, 2, 2, 0, 0, -1, -1, -1, -1, -1, -1, 1, 1]
        );
        assert!(image_group_ids(&[0, 2], 1, 2).is_err());
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (mut rng, seed) = fresh_rng();
        for case in cases(&mut rng) {
            // smaller sizes: finite differences cost two forwards per input element
            let d = AttentionDims {
                batch: case.dims.batch.min(2),
                seq: 7,
                ..case.dims
            };
            let tt = case
                .token_types
                .as_ref()
                .map(|_| random_token_types(&mut rng, d.batch, d.seq));
            let pad = case
                .padding
                .as_ref()
                .map(|p| random_padding(&mut rng, d.batch, d.seq, p[0] == 0 || p[d.seq] == 0));
            let groups = tt
                .as_ref()
                .map(|t| image_group_ids(t, d.batch, d.seq).unwrap());
            let mask = AttentionMask {
                causal: case.causal,
                sliding_window: case.window,
                image_groups: groups.as_deref(),
                key_padding: pad.as_deref(),
            };
            let scale = 0.61;
            let (q, k, v) = (
                random_vec(&mut rng, d.q_len()),
                random_vec(&mut rng, d.kv_len()),
                random_vec(&mut rng, d.kv_len()),
            );
            let d_out = random_vec(&mut rng, d.q_len());
            // loss = <out, d_out>, so d loss / d input is what backward returns
            let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
                let (o, _) = attention_forward_f64(q, k, v, &d, &mask, scale).unwrap();
                o.iter().zip(&d_out).map(|(a, b)| a * b).sum()
            };
            let (out, lse) = attention_forward_f64(&q, &k, &v, &d, &mask, scale).unwrap();
            let (dq, dk, dv) =
                attention_backward_f64(&q, &k, &v, &out, &lse, &d_out, &d, &mask, scale).unwrap();
            let h = 1e-5;
            let numeric = |which: usize| -> Vec<f64> {
                let base = [&q, &k, &v][which];
                (0..base.len())
                    .map(|e| {
                        let mut plus = [q.clone(), k.clone(), v.clone()];
                        let mut minus = plus.clone();
                        plus[which][e] += h;
                        minus[which][e] -= h;
                        (loss(&plus[0], &plus[1], &plus[2]) - loss(&minus[0], &minus[1], &minus[2]))
                            / (2.0 * h)
                    })
                    .collect()
            };
            for (name, analytic, which) in [("dq", &dq, 0), ("dk", &dk, 1), ("dv", &dv, 2)] {
                let err = rel_frobenius(analytic, &numeric(which));
                assert!(
                    err < 1e-7,
                    "seed {seed}: {name} {d:?} causal {} window {:?}: rel error {err}",
                    case.causal,
                    case.window
                );
            }
        }
    }

    #[test]
    fn fully_masked_rows_output_zero_and_pass_no_gradient() {
        let d = AttentionDims {
            batch: 1,
            seq: 5,
            q_heads: 2,
            kv_heads: 1,
            head_dim: 3,
        };
        let (mut rng, _) = fresh_rng();
        let (q, k, v) = (
            random_vec(&mut rng, d.q_len()),
            random_vec(&mut rng, d.kv_len()),
            random_vec(&mut rng, d.kv_len()),
        );
        let pad = [0, 0, 1, 1, 1]; // left padding: queries 0 and 1 see no key under a causal mask
        let mask = AttentionMask {
            causal: true,
            key_padding: Some(&pad),
            ..Default::default()
        };
        let (out, lse) = attention_forward_f64(&q, &k, &v, &d, &mask, 1.0).unwrap();
        let d_out = random_vec(&mut rng, d.q_len());
        let (dq, dk, dv) =
            attention_backward_f64(&q, &k, &v, &out, &lse, &d_out, &d, &mask, 1.0).unwrap();
        let row = d.q_heads * d.head_dim;
        assert!(out[..2 * row].iter().all(|&x| x == 0.0));
        assert!(dq[..2 * row].iter().all(|&x| x == 0.0));
        assert!(out[2 * row..].iter().all(|&x| x != 0.0));
        // padded keys are never seen, so they get no gradient either
        let kv_row = d.kv_heads * d.head_dim;
        assert!(dk[..2 * kv_row]
            .iter()
            .chain(&dv[..2 * kv_row])
            .all(|&x| x == 0.0));
        for h in 0..d.q_heads {
            assert_eq!(lse[h * d.seq], f64::INFINITY);
            assert_eq!(lse[h * d.seq + 1], f64::INFINITY);
            assert!(lse[h * d.seq + 2].is_finite());
        }
    }

    #[test]
    fn rejects_bad_shapes_and_masks() {
        let d = AttentionDims {
            batch: 1,
            seq: 4,
            q_heads: 3,
            kv_heads: 2,
            head_dim: 2,
        };
        let x = vec![0.5f32; 24];
        assert!(attention_forward(&x, &x, &x, &d, &AttentionMask::default(), 1.0).is_err());
        let d = AttentionDims { kv_heads: 3, ..d };
        let window_without_causal = AttentionMask {
            sliding_window: Some(2),
            ..Default::default()
        };
        assert!(attention_forward(&x, &x, &x, &d, &window_without_causal, 1.0).is_err());
        assert!(attention_forward(&x[..20], &x, &x, &d, &AttentionMask::default(), 1.0).is_err());
        assert!(attention_forward(&x, &x, &x, &d, &AttentionMask::default(), 1.0).is_ok());
    }
}
