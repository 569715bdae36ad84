//! torch AdamW over the model's [`Parameter`]s on the GPU (f32 moments beside each tensor), the
//! global-norm clipping of `clip_grad_norm_`, and the optimizer state's host form for checkpoints.

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::checkpoint::HostTensors;
use super::model::Parameter;
use crate::gpu::{AdamWStep, DType, Gpu, GpuTensor, Recorder};

/// torch.optim.AdamW hyper-parameters (transformers' defaults: betas (0.9, 0.999), eps 1e-8,
/// weight_decay 0). Decay applies to every trainable tensor: LoRA A/B and the modules_to_save
/// copies hold no bias or norm weight (transformers' no-decay group).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// First and second moments of one parameter, shaped like it.
pub struct Moments {
    pub exp_avg: GpuTensor,
    pub exp_avg_sq: GpuTensor,
}

/// AdamW state: the steps taken and the moments by PEFT key.
pub struct GpuAdamW {
    pub config: AdamWConfig,
    pub step: u64,
    pub moments: BTreeMap<String, Moments>,
}

/// Writes host values into an existing tensor, recorded into `rec` (copied chunk by chunk from
/// a fresh upload, which the engine splits the same way for the same shape).
pub fn write_f32(gpu: &Gpu, rec: &mut Recorder, dst: &GpuTensor, data: &[f32]) -> Result<()> {
    ensure!(
        dst.dtype() == DType::F32 && dst.numel() == data.len(),
        "writing {} values into a {:?} tensor of shape {:?}",
        data.len(),
        dst.dtype(),
        dst.shape()
    );
    let src = gpu.upload_f32(dst.shape(), data)?;
    ensure!(
        src.chunks().len() == dst.chunks().len(),
        "tensor of shape {:?} is chunked differently from its upload",
        dst.shape()
    );
    for (s, d) in src.chunks().iter().zip(dst.chunks()) {
        rec.copy(&s.view(), &d.view());
    }
    Ok(())
}

impl GpuAdamW {
    /// Zero moments for every parameter (torch initialises them lazily to zeros).
    pub fn new(gpu: &Gpu, params: &[Parameter], config: AdamWConfig) -> Result<Self> {
        let mut moments = BTreeMap::new();
        for p in params {
            let m = Moments {
                exp_avg: gpu.empty(p.value.shape(), DType::F32)?,
                exp_avg_sq: gpu.empty(p.value.shape(), DType::F32)?,
            };
            clear(gpu, &[&m.exp_avg, &m.exp_avg_sq]);
            moments.insert(p.key.clone(), m);
        }
        Ok(Self {
            config,
            step: 0,
            moments,
        })
    }

    /// Records one AdamW step of every parameter with `lr`.
    pub fn step(
        &mut self,
        gpu: &Gpu,
        rec: &mut Recorder,
        params: &[Parameter],
        lr: f64,
    ) -> Result<()> {
        self.step += 1;
        let s = AdamWStep {
            lr,
            beta1: self.config.beta1,
            beta2: self.config.beta2,
            eps: self.config.eps,
            weight_decay: self.config.weight_decay,
            step: self.step,
        };
        for p in params {
            let m = self
                .moments
                .get(&p.key)
                .with_context(|| format!("no optimizer state for `{}`", p.key))?;
            gpu.adamw(rec, &p.value, &p.grad, &m.exp_avg, &m.exp_avg_sq, &s)
                .with_context(|| format!("AdamW on `{}`", p.key))?;
        }
        Ok(())
    }

    /// The moments read back: `<key>.exp_avg`, `<key>.exp_avg_sq` -> (shape, values).
    pub fn to_host(&self, gpu: &Gpu) -> Result<HostTensors> {
        let mut out = BTreeMap::new();
        for (key, m) in &self.moments {
            out.insert(
                format!("{key}.exp_avg"),
                (m.exp_avg.shape().to_vec(), gpu.read_f32(&m.exp_avg)?),
            );
            out.insert(
                format!("{key}.exp_avg_sq"),
                (m.exp_avg_sq.shape().to_vec(), gpu.read_f32(&m.exp_avg_sq)?),
            );
        }
        Ok(out)
    }

    /// Restores the moments written by [`GpuAdamW::to_host`] (every key must be present with
    /// its shape) and the step count.
    pub fn load(
        &mut self,
        gpu: &Gpu,
        rec: &mut Recorder,
        host: &HostTensors,
        step: u64,
    ) -> Result<()> {
        ensure!(
            host.len() == 2 * self.moments.len(),
            "the optimizer state holds {} tensors; the model has {} trainable tensors (2 moments each)",
            host.len(),
            self.moments.len()
        );
        for (key, m) in &self.moments {
            for (suffix, t) in [("exp_avg", &m.exp_avg), ("exp_avg_sq", &m.exp_avg_sq)] {
                let name = format!("{key}.{suffix}");
                let (shape, values) = host
                    .get(&name)
                    .with_context(|| format!("the optimizer state has no `{name}`"))?;
                ensure!(
                    shape.as_slice() == t.shape(),
                    "optimizer state `{name}` has shape {shape:?}, the parameter {:?}",
                    t.shape()
                );
                write_f32(gpu, rec, t, values)?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Zeroes every gradient on the GPU (`clear_buffer`, one submit): no host buffer of the
/// gradients' size is made, which matters for the modules_to_save copies of a large vocabulary.
pub fn zero_grads(gpu: &Gpu, params: &[Parameter]) {
    let grads: Vec<&GpuTensor> = params.iter().map(|p| &p.grad).collect();
    clear(gpu, &grads);
}

/// Sets tensors to zero bytes on the GPU (submitted at once).
fn clear(gpu: &Gpu, tensors: &[&GpuTensor]) {
    let mut enc = gpu
        .device()
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("clear"),
        });
    for t in tensors {
        for c in t.chunks() {
            enc.clear_buffer(c.buffer.buffer(), 0, Some(c.bytes));
        }
    }
    gpu.queue().submit([enc.finish()]);
}

/// Records the global L2 norm of every gradient into `norm` (`[1]` f32) and, with
/// `max_grad_norm > 0`, scales them by `min(1, max / (norm + 1e-6))` (torch `clip_grad_norm_`).
pub fn record_norm_and_clip(
    gpu: &Gpu,
    rec: &mut Recorder,
    params: &[Parameter],
    norm: &GpuTensor,
    max_grad_norm: f64,
) -> Result<()> {
    let grads: Vec<&GpuTensor> = params.iter().map(|p| &p.grad).collect();
    gpu.global_l2_norm(rec, &grads, norm)?;
    if max_grad_norm > 0.0 {
        gpu.clip_by_norm(rec, &grads, norm, max_grad_norm as f32)?;
    }
    Ok(())
}
