//! Fused lm_head + cross-entropy: the truth `shaders/cross_entropy/` is tested against.
//!
//! `hidden [tokens, hidden_size]` (the final-normed hidden states, already shifted by the caller so
//! that row i predicts `labels[i]`), `weight [vocab, hidden_size]` (the tied embedding / lm_head),
//! `labels [tokens]` with [`IGNORE_INDEX`] for rows that do not count. Logits are `hidden · weightᵀ`
//! in f32 (transformers: `lm_head(h).float()`), never soft-capped (Gemma 3 has no final softcap).
//!
//! Returns the loss SUM over counted rows (the caller divides by num_items_in_batch), the number of
//! counted rows, and how many counted rows have `argmax(logits) == label` (TRL's
//! mean_token_accuracy; ties go to the lowest index like torch.argmax). Gradients are of
//! `grad_scale * loss_sum`: `d_hidden = grad_scale * (softmax - onehot) · weight` (0 on ignored rows)
//! and optionally `d_weight += grad_scale * (softmax - onehot)ᵀ · hidden` (accumulated).

pub use crate::shapes::{CrossEntropyDims, CrossEntropyStats, IGNORE_INDEX};
use anyhow::{ensure, Result};

/// Checks shapes and that every label is [`IGNORE_INDEX`] or a vocabulary index.
pub fn validate(
    dims: &CrossEntropyDims,
    hidden: usize,
    weight: usize,
    labels: &[i32],
) -> Result<()> {
    ensure!(
        dims.vocab > 0 && dims.hidden > 0,
        "cross-entropy needs a positive vocab and hidden size, got {dims:?}"
    );
    ensure!(
        hidden == dims.tokens * dims.hidden,
        "hidden has {hidden} elements, expected tokens*hidden = {}",
        dims.tokens * dims.hidden
    );
    ensure!(
        weight == dims.vocab * dims.hidden,
        "weight has {weight} elements, expected vocab*hidden = {}",
        dims.vocab * dims.hidden
    );
    ensure!(
        labels.len() == dims.tokens,
        "labels has {} entries, expected {}",
        labels.len(),
        dims.tokens
    );
    if let Some((row, label)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l != IGNORE_INDEX && (l < 0 || l as usize >= dims.vocab))
    {
        anyhow::bail!("label {label} at row {row} is neither {IGNORE_INDEX} (ignored) nor below the vocabulary size {}", dims.vocab);
    }
    Ok(())
}

/// f32 entry point; `d_weight` (`[vocab, hidden]`) is accumulated into when given.
/// Returns the stats and `d_hidden [tokens, hidden]`.
pub fn lm_head_cross_entropy(
    hidden: &[f32],
    weight: &[f32],
    labels: &[i32],
    dims: &CrossEntropyDims,
    grad_scale: f32,
    d_weight: Option<&mut [f32]>,
) -> Result<(CrossEntropyStats, Vec<f32>)> {
    let widen = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let mut dw64 = d_weight.as_ref().map(|dw| vec![0.0f64; dw.len()]);
    let (stats, dh) = lm_head_cross_entropy_f64(
        &widen(hidden),
        &widen(weight),
        labels,
        dims,
        grad_scale as f64,
        dw64.as_deref_mut(),
    )?;
    if let (Some(dw), Some(acc)) = (d_weight, dw64) {
        ensure!(
            dw.len() == acc.len(),
            "d_weight has {} elements, expected {}",
            dw.len(),
            acc.len()
        );
        for (d, a) in dw.iter_mut().zip(acc) {
            *d += a as f32;
        }
    }
    Ok((stats, dh.iter().map(|&v| v as f32).collect()))
}

/// [`lm_head_cross_entropy`] in f64 (used directly by the finite-difference tests).
pub fn lm_head_cross_entropy_f64(
    hidden: &[f64],
    weight: &[f64],
    labels: &[i32],
    dims: &CrossEntropyDims,
    grad_scale: f64,
    mut d_weight: Option<&mut [f64]>,
) -> Result<(CrossEntropyStats, Vec<f64>)> {
    validate(dims, hidden.len(), weight.len(), labels)?;
    if let Some(dw) = d_weight.as_deref() {
        ensure!(
            dw.len() == weight.len(),
            "d_weight has {} elements, expected {}",
            dw.len(),
            weight.len()
        );
    }
    let h = dims.hidden;
    let mut stats = CrossEntropyStats::default();
    let mut d_hidden = vec![0.0; dims.tokens * h];
    let mut logits = vec![0.0; dims.vocab];
    for (row, &label) in labels.iter().enumerate() {
        if label == IGNORE_INDEX {
            continue;
        }
        let x = &hidden[row * h..][..h];
        for (v, z) in logits.iter_mut().enumerate() {
            *z = x
                .iter()
                .zip(&weight[v * h..][..h])
                .map(|(a, b)| a * b)
                .sum();
        }
        let mut argmax = 0;
        for (v, &z) in logits.iter().enumerate() {
            if z > logits[argmax] {
                argmax = v;
            }
        }
        let max = logits[argmax];
        let lse = max + logits.iter().map(|z| (z - max).exp()).sum::<f64>().ln();
        stats.loss_sum += lse - logits[label as usize];
        stats.counted += 1;
        stats.correct += (argmax == label as usize) as u64;
        let dx = &mut d_hidden[row * h..][..h];
        for (v, &z) in logits.iter().enumerate() {
            let dz = grad_scale * ((z - lse).exp() - (v == label as usize) as u8 as f64);
            for (d, w) in dx.iter_mut().zip(&weight[v * h..][..h]) {
                *d += dz * w;
            }
            if let Some(dw) = d_weight.as_deref_mut() {
                for (d, a) in dw[v * h..][..h].iter_mut().zip(x) {
                    *d += dz * a;
                }
            }
        }
    }
    Ok((stats, d_hidden))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::testing::rel_frobenius;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    fn random_problem(rng: &mut StdRng, d: &CrossEntropyDims) -> (Vec<f64>, Vec<f64>, Vec<i32>) {
        let hidden = (0..d.tokens * d.hidden)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let weight = (0..d.vocab * d.hidden)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let labels = (0..d.tokens)
            .map(|_| {
                if rng.random_range(0..4) == 0 {
                    IGNORE_INDEX
                } else {
                    rng.random_range(0..d.vocab as i32)
                }
            })
            .collect();
        (hidden, weight, labels)
    }

    #[test]
    fn stats_match_materialised_log_softmax() {
        let seed: u64 = rand::random();
        let mut rng = StdRng::seed_from_u64(seed);
        let d = CrossEntropyDims {
            tokens: 23,
            hidden: 9,
            vocab: 37,
        };
        let (hidden, weight, mut labels) = random_problem(&mut rng, &d);
        // make some predictions right so the accuracy count is exercised both ways
        let logits: Vec<Vec<f64>> = (0..d.tokens)
            .map(|t| {
                (0..d.vocab)
                    .map(|v| {
                        (0..d.hidden)
                            .map(|i| hidden[t * d.hidden + i] * weight[v * d.hidden + i])
                            .sum()
                    })
                    .collect()
            })
            .collect();
        for t in (0..d.tokens).step_by(3) {
            if labels[t] != IGNORE_INDEX {
                labels[t] = logits[t]
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .unwrap()
                    .0 as i32;
            }
        }
        let (stats, _) =
            lm_head_cross_entropy_f64(&hidden, &weight, &labels, &d, 1.0, None).unwrap();
        let (mut loss, mut counted, mut correct) = (0.0, 0, 0);
        for t in 0..d.tokens {
            if labels[t] == IGNORE_INDEX {
                continue;
            }
            let z = &logits[t];
            let log_softmax: Vec<f64> = z
                .iter()
                .map(|a| a - z.iter().map(|b| b.exp()).sum::<f64>().ln())
                .collect();
            loss -= log_softmax[labels[t] as usize];
            counted += 1;
            let best = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            correct += (z.iter().position(|&a| a == best).unwrap() == labels[t] as usize) as u64;
        }
        assert!(
            (stats.loss_sum - loss).abs() < 1e-10 * loss,
            "seed {seed}: {} vs {loss}",
            stats.loss_sum
        );
        assert_eq!(
            (stats.counted, stats.correct),
            (counted, correct),
            "seed {seed}"
        );
        assert!(
            correct > 0 && correct < counted,
            "seed {seed}: accuracy should be exercised both ways"
        );
    }

    #[test]
    fn gradients_match_finite_differences() {
        let seed: u64 = rand::random();
        let mut rng = StdRng::seed_from_u64(seed);
        let d = CrossEntropyDims {
            tokens: 7,
            hidden: 5,
            vocab: 11,
        };
        let (hidden, weight, labels) = random_problem(&mut rng, &d);
        let scale = 0.3;
        let mut dw = vec![0.0; weight.len()];
        let (_, dh) =
            lm_head_cross_entropy_f64(&hidden, &weight, &labels, &d, scale, Some(&mut dw)).unwrap();
        let loss = |h: &[f64], w: &[f64]| {
            scale
                * lm_head_cross_entropy_f64(h, w, &labels, &d, 1.0, None)
                    .unwrap()
                    .0
                    .loss_sum
        };
        let eps = 1e-5;
        let numeric = |x: &[f64], f: &dyn Fn(&[f64]) -> f64| -> Vec<f64> {
            (0..x.len())
                .map(|e| {
                    let (mut p, mut m) = (x.to_vec(), x.to_vec());
                    p[e] += eps;
                    m[e] -= eps;
                    (f(&p) - f(&m)) / (2.0 * eps)
                })
                .collect()
        };
        let err_h = rel_frobenius(&dh, &numeric(&hidden, &|h| loss(h, &weight)));
        let err_w = rel_frobenius(&dw, &numeric(&weight, &|w| loss(&hidden, w)));
        assert!(
            err_h < 1e-8 && err_w < 1e-8,
            "seed {seed}: d_hidden {err_h}, d_weight {err_w}"
        );
        for t in 0..d.tokens {
            if labels[t] == IGNORE_INDEX {
                assert!(dh[t * d.hidden..][..d.hidden].iter().all(|&x| x == 0.0));
            }
        }
        // d_weight accumulates
        let mut dw_twice = dw.clone();
        lm_head_cross_entropy_f64(&hidden, &weight, &labels, &d, scale, Some(&mut dw_twice))
            .unwrap();
        assert!(dw_twice
            .iter()
            .zip(&dw)
            .all(|(a, b)| (a - 2.0 * b).abs() < 1e-12));
    }

    #[test]
    fn argmax_ties_go_to_the_lowest_index() {
        // weight rows 1 and 3 are equal, so their logits tie exactly and beat the others
        let weight = [0.0f32, 0.0, 1.0, 1.0, 0.5, 0.5, 1.0, 1.0];
        let d = CrossEntropyDims {
            tokens: 2,
            hidden: 2,
            vocab: 4,
        };
        let (stats, _) =
            lm_head_cross_entropy(&[1.0, 1.0, 2.0, 2.0], &weight, &[1, 3], &d, 1.0, None).unwrap();
        assert_eq!((stats.counted, stats.correct), (2, 1));
    }

    #[test]
    fn rejects_labels_outside_the_vocabulary() {
        let d = CrossEntropyDims {
            tokens: 2,
            hidden: 1,
            vocab: 3,
        };
        let err = lm_head_cross_entropy(&[1.0, 2.0], &[1.0, 2.0, 3.0], &[0, 3], &d, 1.0, None)
            .unwrap_err();
        assert!(err.to_string().contains("row 1"), "{err}");
        assert!(
            lm_head_cross_entropy(&[1.0, 2.0], &[1.0, 2.0, 3.0], &[-1, 0], &d, 1.0, None).is_err()
        );
        assert!(lm_head_cross_entropy(
            &[1.0, 2.0],
            &[1.0, 2.0, 3.0],
            &[IGNORE_INDEX, 2],
            &d,
            1.0,
            None
        )
        .is_ok());
    }
}
