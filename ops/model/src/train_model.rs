//! What the training loop needs from a model: its trainable tensors (with gradient buffers) and
//! one micro-batch's forward + backward recorded on the GPU. The loop (zeroing, accumulation,
//! clipping, AdamW, schedule, metrics, checkpoints) lives beside it and never looks inside the model.

use anyhow::Result;

use data::collate::Batch;
use engine::gpu::{Gpu, GpuTensor, Recorder};

/// torch.optim.AdamW hyper-parameters (transformers' defaults: betas (0.9, 0.999), eps 1e-8,
/// weight_decay 0), of the GPU trainer (`train::optimizer`) and the CPU reference's loop
/// (`reference::train`) alike. Decay applies to every trainable tensor: LoRA A/B and the
/// modules_to_save copies hold no bias or norm weight (transformers' no-decay group).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
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

/// One trainable tensor on the GPU: its PEFT key (`base_model.model.<module>.lora_A.weight`,
/// `base_model.model.lm_head.weight` for a `modules_to_save` copy, as PEFT saves them), the f32
/// value the optimizer updates in place, and its f32 gradient of the same shape.
#[derive(Debug, Clone)]
pub struct Parameter {
    pub key: String,
    pub value: GpuTensor,
    pub grad: GpuTensor,
}

/// What [`TrainModel::accumulate_notify`] calls with the indices of gradients just made final.
pub type GradsReady<'a> = dyn FnMut(&[usize]) -> Result<()> + 'a;

/// A model the loop can train.
pub trait TrainModel {
    /// Every trainable tensor, always in the same order (checkpoints and the optimizer state
    /// are keyed by `Parameter::key`).
    fn parameters(&self) -> Vec<Parameter>;

    /// Records the forward and backward of one micro-batch into `rec`, ADDING the gradients of
    /// `loss_scale · Σ cross-entropy` (summed over the shifted label tokens of `batch`) into every
    /// `Parameter::grad`. `call` numbers the micro-batches of the whole run (dropout masks are
    /// derived from it, so a resumed run draws the same masks). Returns the `[4]` u32 totals the
    /// fused lm_head + cross-entropy kernel writes (loss sum as f32 bits, counted tokens,
    /// correct argmax tokens, 0): read them with [`Gpu::read_cross_entropy_totals`] after submit.
    fn accumulate(
        &mut self,
        gpu: &Gpu,
        rec: &mut Recorder,
        batch: &Batch,
        loss_scale: f32,
        call: u64,
    ) -> Result<GpuTensor>;

    /// [`TrainModel::accumulate`] that also calls `ready(indices)` (indices into
    /// [`TrainModel::parameters`]) as soon as the work that finishes those gradients has been
    /// submitted, every gradient exactly once, so that a data-parallel step can start summing
    /// them across ranks while the rest of the backward runs (`train::grad_sync`). The default
    /// reports all of them at the end; a model reports them layer by layer.
    fn accumulate_notify(
        &mut self,
        gpu: &Gpu,
        rec: &mut Recorder,
        batch: &Batch,
        loss_scale: f32,
        call: u64,
        ready: &mut GradsReady,
    ) -> Result<GpuTensor> {
        let totals = self.accumulate(gpu, rec, batch, loss_scale, call)?;
        rec.flush();
        ready(&(0..self.parameters().len()).collect::<Vec<_>>())?;
        Ok(totals)
    }

    /// For a parameter whose gradient is zero outside some rows (an embedding table: the rows
    /// of the tokens it embeds), those rows for `batch` (a superset is fine); `None`: dense.
    /// Only those rows travel in a data-parallel step's all-reduce.
    fn gradient_rows(&self, _param: usize, _batch: &Batch) -> Option<Vec<u32>> {
        None
    }
}
