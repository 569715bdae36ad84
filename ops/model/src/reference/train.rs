//! A small CPU optimizer loop for the reference: torch AdamW, global-norm clipping and the
//! linear schedule exactly as transformers' Trainer runs them, so the reference can
//! replay a recorded SFTTrainer run step for step.

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};

use super::lora::{Adapter, AdapterGrads, LoraCall};
use super::loss::{count_label_tokens, LossNormalization};
use super::{Batch, Gemma3Reference};
pub use crate::train_model::AdamWConfig;

/// AdamW state of every tensor (first and second moments, f64), by PEFT key.
#[derive(Debug, Clone, Default)]
pub struct AdamWState {
    pub step: u64,
    pub moments: BTreeMap<String, (Vec<f64>, Vec<f64>)>,
}

impl AdamWState {
    /// One torch AdamW step (`foreach=False` math): `p ← p·(1 − lr·wd)`, `m ← β1·m + (1−β1)·g`,
    /// `v ← β2·v + (1−β2)·g²`, `p ← p − lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + eps)`.
    pub fn step(
        &mut self,
        params: BTreeMap<String, &mut Vec<f32>>,
        grads: &BTreeMap<String, &[f32]>,
        lr: f64,
        cfg: &AdamWConfig,
    ) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - cfg.beta1.powi(t);
        let bc2_sqrt = (1.0 - cfg.beta2.powi(t)).sqrt();
        for (key, p) in params {
            let g = grads
                .get(&key)
                .with_context(|| format!("no gradient for `{key}`"))?;
            ensure!(
                g.len() == p.len(),
                "gradient of `{key}` has {} values, the tensor {}",
                g.len(),
                p.len()
            );
            let (m, v) = self
                .moments
                .entry(key)
                .or_insert_with(|| (vec![0.0; p.len()], vec![0.0; p.len()]));
            for i in 0..p.len() {
                let gi = g[i] as f64;
                let mut pi = p[i] as f64 * (1.0 - lr * cfg.weight_decay);
                m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * gi;
                v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * gi * gi;
                let denom = v[i].sqrt() / bc2_sqrt + cfg.eps;
                pi -= lr / bc1 * m[i] / denom;
                p[i] = pi as f32;
            }
        }
        Ok(())
    }
}

/// The global L2 norm over every gradient (`clip_grad_norm_`'s total, before clipping).
pub fn global_grad_norm(grads: &AdapterGrads) -> f64 {
    grads
        .by_peft_key()
        .values()
        .flat_map(|g| g.iter())
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
}

/// `clip_grad_norm_(max_norm)`: scales every gradient by `min(1, max_norm / (norm + 1e-6))`.
/// Returns the pre-clip norm (what the Trainer logs as grad_norm).
pub fn clip_grad_norm(grads: &mut AdapterGrads, max_norm: f64) -> f64 {
    let norm = global_grad_norm(grads);
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    if coef < 1.0 {
        let scale = |v: &mut Vec<f32>| v.iter_mut().for_each(|x| *x = (*x as f64 * coef) as f32);
        for (da, db) in grads.pairs.values_mut() {
            scale(da);
            scale(db);
        }
        grads.lm_head.iter_mut().for_each(scale);
        grads.embed_tokens.iter_mut().for_each(scale);
    }
    norm
}

/// The linear schedule with warmup (transformers `get_linear_schedule_with_warmup`): the lr used
/// by the optimizer step that follows `steps_done` earlier steps.
pub fn linear_lr(lr0: f64, steps_done: usize, total_steps: usize, warmup_steps: usize) -> f64 {
    if steps_done < warmup_steps {
        return lr0 * steps_done as f64 / warmup_steps.max(1) as f64;
    }
    let left = total_steps.saturating_sub(steps_done) as f64;
    lr0 * (left / (total_steps - warmup_steps).max(1) as f64).max(0.0)
}

/// What one optimizer step reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Σ CE over the step's label tokens / `num_items_in_batch`.
    pub loss: f64,
    pub num_items_in_batch: usize,
    pub grad_norm_pre_clip: f64,
    pub learning_rate: f64,
}

/// One optimizer step over the micro-batches of an accumulation cycle (token-mean loss over
/// all of them, as transformers 5.24), then clipping and AdamW.
pub fn train_step(
    model: &Gemma3Reference,
    adapter: &mut Adapter,
    micro_batches: &[Batch],
    state: &mut AdamWState,
    optimizer: &AdamWConfig,
    lr: f64,
    max_grad_norm: Option<f64>,
) -> Result<StepReport> {
    let mut num_items = 0;
    for b in micro_batches {
        num_items += count_label_tokens(&Gemma3Reference::shifted_labels(b, true)?);
    }
    let normalization = LossNormalization::TokenMean { num_items };
    let mut grads = AdapterGrads::zeros_like(adapter);
    let mut loss = 0.0;
    for (i, b) in micro_batches.iter().enumerate() {
        let call = LoraCall {
            adapter: Some(adapter),
            training: true,
            call: state.step * micro_batches.len() as u64 + i as u64,
        };
        loss += model
            .forward_backward(b, &call, normalization, &mut grads)
            .with_context(|| format!("micro-batch {i}"))?
            .loss;
    }
    let grad_norm_pre_clip = match max_grad_norm {
        Some(max) => clip_grad_norm(&mut grads, max),
        None => global_grad_norm(&grads),
    };
    ensure!(
        loss.is_finite() && grad_norm_pre_clip.is_finite(),
        "non-finite loss ({loss}) or gradient norm ({grad_norm_pre_clip})"
    );
    let g = grads.by_peft_key();
    state.step(adapter.tensors_mut(), &g, lr, optimizer)?;
    Ok(StepReport {
        loss,
        num_items_in_batch: num_items,
        grad_norm_pre_clip,
        learning_rate: lr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_step_matches_hand_computation() {
        // One element, step 1: m = 0.1·g, v = 0.001·g², m̂ = g, v̂ = g² → p −= lr·g/(|g| + eps),
        // after the decay p·(1 − lr·wd).
        let mut p = vec![0.5f32, -2.0];
        let g = [0.25f32, -4.0];
        let mut state = AdamWState::default();
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut params = BTreeMap::new();
        params.insert("w".to_string(), &mut p);
        let grads: BTreeMap<String, &[f32]> = [("w".to_string(), &g[..])].into_iter().collect();
        state.step(params, &grads, 0.01, &cfg).unwrap();
        let want0 = 0.5 * (1.0 - 0.001) - 0.01 * 0.25 / (0.25 + 1e-8);
        let want1 = -2.0 * (1.0 - 0.001) + 0.01 * 4.0 / (4.0 + 1e-8);
        assert!(
            (p[0] as f64 - want0).abs() < 1e-7 && (p[1] as f64 - want1).abs() < 1e-7,
            "{p:?}"
        );
    }

    #[test]
    fn linear_schedule_is_transformers() {
        // lr0·(T − s)/T, first step uses lr0 (train.json: 0.01, 0.00667, 0.00333).
        assert_eq!(linear_lr(0.01, 0, 3, 0), 0.01);
        assert!((linear_lr(0.01, 1, 3, 0) - 0.006_666_666_666_666_667).abs() < 1e-15);
        assert_eq!(linear_lr(1.0, 1, 10, 2), 0.5);
        assert_eq!(linear_lr(1.0, 2, 10, 2), 1.0);
        assert_eq!(linear_lr(1.0, 10, 10, 2), 0.0);
    }
}
