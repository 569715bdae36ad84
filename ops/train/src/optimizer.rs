//! torch AdamW over the model's [`Parameter`]s on the GPU (moments beside each tensor, in its
//! dtype: f32, or bf16 for the bf16 modules_to_save copies), optionally with the moments of the two large modules_to_save copies on the
//! host ([`Optim::AdamWOffload`]), the global-norm clipping of `clip_grad_norm_`, and the
//! optimizer state's host form for checkpoints.

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

use rayon::prelude::*;

use super::checkpoint::HostTensors;
use engine::gpu::{AdamWStep, DType, Gpu, GpuTensor, Recorder};
use engine::reference::adamw::adamw_step;
use model::names::{EMBED_TOKENS, LM_HEAD};
use model::reference::lora::PEFT_PREFIX;
use model::train_model::Parameter;

/// Where AdamW keeps the moments of the modules_to_save copies (`optim` of lora-train).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Optim {
    /// torch.optim.AdamW, every state on the device (`adamw_torch`; transformers'
    /// `adamw_torch_fused` is the same update in one kernel launch, so it maps here).
    #[default]
    AdamWTorch,
    /// The moments of the modules_to_save copies (lm_head, embed_tokens: 671M values each at
    /// 4B) and their update on the host, f32 math as the kernel, over rayon; the device holds
    /// only their values and gradients (DeepSpeed ZeRO-Offload's split). LoRA pairs stay on
    /// the device (a few MB).
    AdamWOffload,
}

impl Optim {
    /// The lora-train `optim` names.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "adamw_torch" | "adamw_torch_fused" => Ok(Optim::AdamWTorch),
            "adamw_offload" => Ok(Optim::AdamWOffload),
            other => Err(format!(
                "optim `{other}` is not supported: use \"adamw_torch\" (the default; \
                 \"adamw_torch_fused\" runs the same update) or \"adamw_offload\" (the \
                 modules_to_save copies' AdamW states and update on the host)"
            )),
        }
    }
}

/// Whether `key` is a modules_to_save copy (the tensors [`Optim::AdamWOffload`] moves).
pub fn is_modules_to_save(key: &str) -> bool {
    key.strip_prefix(PEFT_PREFIX)
        .is_some_and(|k| k == LM_HEAD || k == EMBED_TOKENS)
}

/// The moments of one offloaded parameter on the host, row-major like it.
pub struct HostMoments {
    pub shape: Vec<usize>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

pub use model::train_model::AdamWConfig;

/// First and second moments of one parameter, shaped like it.
pub struct Moments {
    pub exp_avg: GpuTensor,
    pub exp_avg_sq: GpuTensor,
}

/// AdamW state: the steps taken and the moments by PEFT key, on the device or (offloaded) on
/// the host.
pub struct GpuAdamW {
    pub config: AdamWConfig,
    pub step: u64,
    pub moments: BTreeMap<String, Moments>,
    pub host: BTreeMap<String, HostMoments>,
}

/// Values per rayon task of the host update (large enough to amortise the task, small enough
/// to spread a 128 MiB chunk over every core).
const HOST_TASK: usize = 1 << 16;

/// Writes host values into an existing tensor, recorded into `rec` (copied chunk by chunk from
/// a fresh upload, which the engine splits the same way for the same shape).
/// A bf16 `dst` takes the values rounded to nearest even.
pub fn write_f32(gpu: &Gpu, rec: &mut Recorder, dst: &GpuTensor, data: &[f32]) -> Result<()> {
    ensure!(
        matches!(dst.dtype(), DType::F32 | DType::BF16) && dst.numel() == data.len(),
        "writing {} values into a {:?} tensor of shape {:?}",
        data.len(),
        dst.dtype(),
        dst.shape()
    );
    let src = gpu.upload_f32_as(dst.shape(), data, dst.dtype())?;
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
    /// Zero moments for every parameter (torch initialises them lazily to zeros), all on the
    /// device.
    pub fn new(gpu: &Gpu, params: &[Parameter], config: AdamWConfig) -> Result<Self> {
        Self::with_optim(gpu, params, config, Optim::AdamWTorch)
    }

    /// Zero moments, the modules_to_save copies' on the host with [`Optim::AdamWOffload`].
    pub fn with_optim(
        gpu: &Gpu,
        params: &[Parameter],
        config: AdamWConfig,
        optim: Optim,
    ) -> Result<Self> {
        let mut moments = BTreeMap::new();
        let mut host = BTreeMap::new();
        for p in params {
            ensure!(
                p.grad.dtype() == p.value.dtype(),
                "AdamW: `{}` is {:?} but its gradient {:?}",
                p.key,
                p.value.dtype(),
                p.grad.dtype()
            );
            if optim == Optim::AdamWOffload && is_modules_to_save(&p.key) {
                let n = p.value.numel();
                host.insert(
                    p.key.clone(),
                    HostMoments {
                        shape: p.value.shape().to_vec(),
                        exp_avg: vec![0.0; n],
                        exp_avg_sq: vec![0.0; n],
                    },
                );
                continue;
            }
            // In the parameter's dtype, as torch keeps them (bf16 for bf16 parameters).
            let m = Moments {
                exp_avg: gpu.empty(p.value.shape(), p.value.dtype())?,
                exp_avg_sq: gpu.empty(p.value.shape(), p.value.dtype())?,
            };
            gpu.zero(&[&m.exp_avg, &m.exp_avg_sq]);
            moments.insert(p.key.clone(), m);
        }
        Ok(Self {
            config,
            step: 0,
            moments,
            host,
        })
    }

    /// Records one AdamW step of every parameter with `lr`. Offloaded parameters are updated
    /// at once on the host: their gradients are read (after every earlier submit, so after
    /// clipping) and their new values written, ordered before the next submit.
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
            if let Some(h) = self.host.get_mut(&p.key) {
                host_step(gpu, p, h, &s)
                    .with_context(|| format!("AdamW on the host, `{}`", p.key))?;
                continue;
            }
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
        for (key, h) in &self.host {
            let shape = h.shape.clone();
            out.insert(format!("{key}.exp_avg"), (shape.clone(), h.exp_avg.clone()));
            out.insert(format!("{key}.exp_avg_sq"), (shape, h.exp_avg_sq.clone()));
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
        let tensors = self.moments.len() + self.host.len();
        ensure!(
            host.len() == 2 * tensors,
            "the optimizer state holds {} tensors; the model has {tensors} trainable tensors (2 moments each)",
            host.len(),
        );
        for (key, h) in self.host.iter_mut() {
            for (suffix, t) in [
                ("exp_avg", &mut h.exp_avg),
                ("exp_avg_sq", &mut h.exp_avg_sq),
            ] {
                let name = format!("{key}.{suffix}");
                let (shape, values) = host
                    .get(&name)
                    .with_context(|| format!("the optimizer state has no `{name}`"))?;
                ensure!(
                    *shape == h.shape && values.len() == t.len(),
                    "optimizer state `{name}` has shape {shape:?}, the parameter {:?}",
                    h.shape
                );
                t.copy_from_slice(values);
            }
        }
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

/// One AdamW step of an offloaded parameter, a chunk of the device tensor at a time (at most
/// one binding of values and gradients on the host at once): the same f32 update as the kernel
/// ([`adamw_step`], the kernels' reference), spread over rayon tasks.
fn host_step(gpu: &Gpu, p: &Parameter, h: &mut HostMoments, s: &AdamWStep) -> Result<()> {
    ensure!(
        p.value.chunks().len() == p.grad.chunks().len(),
        "the value and the gradient are chunked differently"
    );
    let row = p.value.row_len();
    // bf16 state: the update in f32, the parameter and the moments rounded as the kernel's.
    let update = if p.value.dtype() == DType::BF16 {
        engine::reference::adamw::adamw_step_bf16
    } else {
        adamw_step
    };
    for k in 0..p.value.chunks().len() {
        let mut value = gpu.read_chunk_f32(&p.value, k)?;
        let grad = gpu.read_chunk_f32(&p.grad, k)?;
        let start = p.value.chunks()[k].first_row * row;
        let range = start..start + value.len();
        value
            .par_chunks_mut(HOST_TASK)
            .zip(grad.par_chunks(HOST_TASK))
            .zip(h.exp_avg[range.clone()].par_chunks_mut(HOST_TASK))
            .zip(h.exp_avg_sq[range].par_chunks_mut(HOST_TASK))
            .for_each(|(((v, g), m), v2)| update(v, g, m, v2, s));
        gpu.write_chunk_f32(&p.value, k, &value)?;
    }
    Ok(())
}

/// Zeroes every gradient on the GPU (`clear_buffer`, one submit): no host buffer of the
/// gradients' size is made, which matters for the modules_to_save copies of a large vocabulary.
pub fn zero_grads(gpu: &Gpu, params: &[Parameter]) {
    let grads: Vec<&GpuTensor> = params.iter().map(|p| &p.grad).collect();
    gpu.zero(&grads);
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

#[cfg(test)]
mod tests {
    use super::*;
    use engine::gpu::testing::{rel_frobenius, test_gpu, tiny_binding_gpu, TestRng};

    /// Three AdamW steps of a modules_to_save copy (chunked on the small-binding engine, so the
    /// host update walks several chunks) and a LoRA tensor, once with every state on the device
    /// and once with `adamw_offload`: the same values and moments. The host runs the kernels'
    /// reference update; the kernel matches it to 1e-6 (kernels::adamw tests), so the two paths
    /// agree to that bound, well below one step's change (lr 1e-2 here).
    fn offload_matches_device(gpu: &Gpu) {
        offload_matches_device_typed(gpu, false)
    }

    /// With `bf16` the table, its gradient and its moments are bf16: the kernel and the host
    /// round the same f32 update, but WGSL's sqrt and division need not be correctly rounded,
    /// so a few values may land one bf16 ulp (2⁻⁸ relative) apart and drift from there: a
    /// relative Frobenius bound of 4e-3 (every value one ulp off would be ~3e-3 at most).
    fn offload_matches_device_typed(gpu: &Gpu, bf16: bool) {
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        let table = format!("{PEFT_PREFIX}{LM_HEAD}");
        let lora = format!("{PEFT_PREFIX}model.layers.0.q_proj.lora_A.weight");
        let shapes = [(table.clone(), [97usize, 24]), (lora, [4, 24])];
        let init: Vec<Vec<f32>> = shapes
            .iter()
            .map(|(_, s)| rng.vec_normal(s[0] * s[1]))
            .collect();
        let grads: Vec<Vec<Vec<f32>>> = (0..3)
            .map(|_| {
                shapes
                    .iter()
                    .map(|(_, s)| rng.vec_normal(s[0] * s[1]))
                    .collect()
            })
            .collect();
        let config = AdamWConfig {
            weight_decay: 0.01,
            ..AdamWConfig::default()
        };
        let run = |optim: Optim| -> (HostTensors, HostTensors) {
            let params: Vec<Parameter> = shapes
                .iter()
                .zip(&init)
                .map(|((key, s), v)| {
                    let dtype = if bf16 && is_modules_to_save(key) {
                        DType::BF16
                    } else {
                        DType::F32
                    };
                    let value = gpu.empty(s, dtype).unwrap();
                    let mut rec = Recorder::new(gpu);
                    write_f32(gpu, &mut rec, &value, v).unwrap();
                    rec.submit();
                    Parameter {
                        key: key.clone(),
                        value,
                        grad: gpu.empty(s, dtype).unwrap(),
                    }
                })
                .collect();
            let mut opt = GpuAdamW::with_optim(gpu, &params, config, optim).unwrap();
            assert_eq!(opt.host.len(), usize::from(optim == Optim::AdamWOffload));
            for step in &grads {
                let mut rec = Recorder::new(gpu);
                for (p, g) in params.iter().zip(step) {
                    write_f32(gpu, &mut rec, &p.grad, g).unwrap();
                }
                rec.submit();
                let mut rec = Recorder::new(gpu);
                opt.step(gpu, &mut rec, &params, 1e-2).unwrap();
                rec.submit_and_wait().unwrap();
            }
            let values = params
                .iter()
                .map(|p| {
                    let v = gpu.read_f32(&p.value).unwrap();
                    (p.key.clone(), (p.value.shape().to_vec(), v))
                })
                .collect();
            (values, opt.to_host(gpu).unwrap())
        };
        let (dev_values, dev_state) = run(Optim::AdamWTorch);
        let (host_values, host_state) = run(Optim::AdamWOffload);
        assert_eq!(
            dev_state.keys().collect::<Vec<_>>(),
            host_state.keys().collect::<Vec<_>>()
        );
        for (what, dev, host) in [
            ("value", &dev_values, &host_values),
            ("state", &dev_state, &host_state),
        ] {
            for (key, (shape, want)) in dev {
                let (got_shape, got) = &host[key];
                assert_eq!(got_shape, shape, "{what} {key}");
                let e = rel_frobenius(got, want);
                let tol = if bf16 && key.starts_with(&table) {
                    4e-3
                } else {
                    1e-6
                };
                assert!(e <= tol, "seed {seed}: {what} {key}: rel err {e}");
            }
        }
        // The update moved the values (a test that cannot pass on untouched tensors).
        let moved = rel_frobenius(&host_values[&table].1, &init[0]);
        assert!(moved > 1e-3, "the table barely moved: {moved}");
    }

    #[test]
    fn adamw_offload_matches_the_device_update() {
        offload_matches_device(test_gpu());
        // 4 KiB bindings: the [97, 24] table is split into chunks of 42 rows.
        let small = tiny_binding_gpu();
        offload_matches_device(small);
    }

    #[test]
    fn adamw_offload_matches_the_device_update_in_bf16() {
        offload_matches_device_typed(test_gpu(), true);
        offload_matches_device_typed(tiny_binding_gpu(), true);
    }

    #[test]
    fn optim_names() {
        assert_eq!(Optim::parse("adamw_torch"), Ok(Optim::AdamWTorch));
        assert_eq!(Optim::parse("adamw_torch_fused"), Ok(Optim::AdamWTorch));
        assert_eq!(Optim::parse("adamw_offload"), Ok(Optim::AdamWOffload));
        let e = Optim::parse("adamw_8bit").unwrap_err();
        assert!(
            e.contains("adamw_8bit") && e.contains("adamw_offload"),
            "{e}"
        );
        assert!(is_modules_to_save(&format!("{PEFT_PREFIX}{EMBED_TOKENS}")));
        assert!(!is_modules_to_save(&format!(
            "{PEFT_PREFIX}model.layers.0.q_proj.lora_A.weight"
        )));
    }
}
