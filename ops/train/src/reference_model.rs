//! A [`TrainModel`] whose forward and backward run on the CPU reference
//! ([`Gemma3Reference::forward_backward`]) while its parameters and gradients live on the GPU
//! like any model's: it tests the training loop against the golden run independently of the
//! GPU model, and trains tiny models where speed does not matter.
//!
//! `accumulate` reads the current parameter values back, runs the reference on the micro-batch,
//! adds `loss_scale ×` its gradients into the GPU gradient buffers (recorded into the caller's
//! recorder) and returns the cross-entropy totals tensor the GPU kernel would write.

use anyhow::{ensure, Context, Result};

use super::optimizer::write_f32;
use data::collate::Batch;
use engine::gpu::{DType, Gpu, GpuTensor, Recorder};
use model::reference::lora::{Adapter, AdapterGrads, LoraCall, PEFT_PREFIX};
use model::reference::loss::LossNormalization;
use model::reference::{self, Gemma3Reference};
use model::train_model::{Parameter, TrainModel};

pub struct ReferenceTrainModel {
    pub model: Gemma3Reference,
    /// The host copy of the adapter, refreshed from the GPU values at every micro-batch.
    pub adapter: Adapter,
    params: Vec<Parameter>,
}

/// The shape of each adapter tensor by PEFT key.
fn shape_of(
    model: &Gemma3Reference,
    adapter: &Adapter,
    key: &str,
    len: usize,
) -> Result<Vec<usize>> {
    let rest = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
    if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        let r = adapter.pairs[m].rank;
        return Ok(vec![r, len / r]);
    }
    if let Some(m) = rest.strip_suffix(".lora_B.weight") {
        let r = adapter.pairs[m].rank;
        return Ok(vec![len / r, r]);
    }
    let h = model.text.hidden;
    ensure!(
        len.is_multiple_of(h),
        "`{key}` has {len} values, not a multiple of hidden {h}"
    );
    Ok(vec![len / h, h])
}

/// The reference's view of a collated batch.
pub fn to_reference_batch(b: &Batch) -> reference::Batch {
    reference::Batch {
        batch: b.batch_size,
        seq: b.seq_len,
        input_ids: b.input_ids.clone(),
        attention_mask: b.attention_mask.clone(),
        token_type_ids: b.token_type_ids.clone(),
        labels: Some(b.labels.clone()),
        pixel_values: b.pixel_values.clone(),
        images: b.num_images,
    }
}

impl ReferenceTrainModel {
    /// Uploads every tensor of `adapter` as a trainable parameter (sorted by PEFT key).
    pub fn new(gpu: &Gpu, model: Gemma3Reference, adapter: Adapter) -> Result<Self> {
        let mut params = Vec::new();
        for (key, values) in adapter.by_peft_key() {
            let shape = shape_of(&model, &adapter, &key, values.len())?;
            let value = gpu.upload_f32(&shape, values)?;
            let grad = gpu.empty(&shape, DType::F32)?;
            gpu.fill_f32(&grad, 0.0)?;
            params.push(Parameter { key, value, grad });
        }
        Ok(Self {
            model,
            adapter,
            params,
        })
    }

    /// Copies the GPU parameter values into the host adapter.
    pub fn sync_adapter(&mut self, gpu: &Gpu) -> Result<()> {
        let mut tensors = self.adapter.tensors_mut();
        for p in &self.params {
            let host = tensors
                .get_mut(&p.key)
                .with_context(|| format!("no host tensor `{}`", p.key))?;
            **host = gpu.read_f32(&p.value)?;
        }
        Ok(())
    }
}

impl TrainModel for ReferenceTrainModel {
    fn parameters(&self) -> Vec<Parameter> {
        self.params.clone()
    }

    fn accumulate(
        &mut self,
        gpu: &Gpu,
        rec: &mut Recorder,
        batch: &Batch,
        loss_scale: f32,
        call: u64,
    ) -> Result<GpuTensor> {
        self.sync_adapter(gpu)?;
        let rb = to_reference_batch(batch);
        let mut grads = AdapterGrads::zeros_like(&self.adapter);
        let lora = LoraCall {
            adapter: Some(&self.adapter),
            training: true,
            call,
        };
        // Gradients of the plain sum (scale 1), scaled below as the GPU kernel's grad_scale would.
        let out = self.model.forward_backward(
            &rb,
            &lora,
            LossNormalization::TokenMean { num_items: 1 },
            &mut grads,
        )?;
        let by_key = grads.by_peft_key();
        for p in &self.params {
            let g = by_key
                .get(&p.key)
                .with_context(|| format!("no gradient for `{}`", p.key))?;
            let mut sum = gpu.read_f32(&p.grad)?;
            sum.iter_mut()
                .zip(g.iter())
                .for_each(|(s, d)| *s += loss_scale * d);
            write_f32(gpu, rec, &p.grad, &sum)?;
        }
        gpu.upload_u32(
            &[4],
            &[
                (out.stats.loss_sum as f32).to_bits(),
                out.stats.counted as u32,
                out.stats.correct as u32,
                0,
            ],
        )
    }
}
