//! A frozen `nn.Linear` on the GPU (dense f32 or NF4 base weight, optional bias) with an optional
//! trainable PEFT LoRA pair: the GPU twin of [`crate::reference::lora::Linear`].
//!
//! `y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ`, `W [out, in]`, `A [r, in]`, `B [out, r]`. The backward
//! accumulates `dA`, `dB` into the pair's gradient buffers and returns `dx` through the frozen
//! weight and the LoRA branch. Dropout masks come from [`lora_dropout_seed`] of the module path
//! and the call counter, so the GPU draws exactly the reference's masks; a call run in slices
//! of rows ([`GpuLinear::forward_at`], the vision tower one image at a time) offsets each
//! slice's mask indices so that the slices together draw the whole call's mask.

use anyhow::{ensure, Context, Result};

use crate::config::FloatDtype;
use crate::reference::lora::{lora_dropout_seed, LoraPair, LoraSettings};
use crate::weights::TensorRef;
use crate::Weights;
use engine::gpu::{DType, Gpu, GpuTensor, Lora, MatmulOpts, MatmulPrecision, Nf4Weight, Recorder};

/// The frozen base weight of a linear layer.
#[derive(Debug, Clone)]
pub enum BaseWeight {
    /// `[out, in]` f32, or bf16 as the checkpoint stores it ([`DenseStorage::AsStored`]).
    Dense(GpuTensor),
    /// bitsandbytes NF4 (absmax already dequantized to f32), dequantized inside the matmul tile loop.
    Nf4(Nf4Weight),
}

/// How the dense (unquantized) base weights are kept on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DenseStorage {
    /// A bf16 checkpoint tensor stays bf16: the same values as widened to f32 (widening is
    /// exact), in half the memory, and half the bytes each product reads (decoding reads every
    /// weight once per token). Other dtypes widen to f32.
    #[default]
    AsStored,
    /// Every dense weight widened to f32: products with f16 operands read only f32 weights.
    F32,
}

impl DenseStorage {
    /// What products of `precision` can read: `self`, or f32 for f16 operands.
    pub fn for_precision(self, precision: MatmulPrecision) -> Self {
        match precision {
            MatmulPrecision::F32 => self,
            MatmulPrecision::F16 => DenseStorage::F32,
        }
    }

    /// The device dtype of a dense tensor stored in `stored`.
    pub fn device_dtype(self, stored: Option<FloatDtype>) -> DType {
        match (self, stored) {
            (DenseStorage::AsStored, Some(FloatDtype::BF16)) => DType::BF16,
            _ => DType::F32,
        }
    }
}

/// Uploads checkpoint tensor `t` as `dtype` (f32 or bf16): a bf16 tensor's bits go up as they
/// are, without an f32 copy on the host (Gemma 3 4B's embedding table: 1.3 GB of bits against
/// 2.7 GB of f32); other dtypes are widened, and rounded to bf16 where `dtype` says so.
pub(crate) fn upload_tensor(
    gpu: &Gpu,
    t: &TensorRef,
    shape: &[usize],
    dtype: DType,
) -> Result<GpuTensor> {
    match dtype {
        DType::BF16 => gpu.upload_bf16(shape, &t.to_bf16_bits()?),
        _ => gpu.upload_f32(shape, &t.to_f32()?),
    }
}

/// A trainable LoRA pair with its gradient buffers (same shapes, f32).
#[derive(Debug, Clone)]
pub struct GpuLoraPair {
    /// `[r, in]`.
    pub a: GpuTensor,
    /// `[out, r]`.
    pub b: GpuTensor,
    /// `[r, in]`, accumulated by every backward until the trainer zeroes it.
    pub grad_a: GpuTensor,
    /// `[out, r]`.
    pub grad_b: GpuTensor,
}

impl GpuLoraPair {
    /// Uploads a pair and allocates zeroed gradients.
    pub fn upload(
        gpu: &Gpu,
        pair: &LoraPair,
        in_features: usize,
        out_features: usize,
    ) -> Result<Self> {
        let r = pair.rank;
        ensure!(
            pair.a.len() == r * in_features && pair.b.len() == out_features * r,
            "LoRA pair of rank {r} does not fit a [{out_features}, {in_features}] linear"
        );
        let grad_a = gpu.empty(&[r, in_features], DType::F32)?;
        let grad_b = gpu.empty(&[out_features, r], DType::F32)?;
        gpu.fill_f32(&grad_a, 0.0)?;
        gpu.fill_f32(&grad_b, 0.0)?;
        Ok(Self {
            a: gpu.upload_f32(&[r, in_features], &pair.a)?,
            b: gpu.upload_f32(&[out_features, r], &pair.b)?,
            grad_a,
            grad_b,
        })
    }

    pub fn rank(&self) -> usize {
        self.a.shape()[0]
    }
}

/// How LoRA runs in one forward/backward: scaling, dropout (0 outside training) and the seeds.
#[derive(Debug, Clone, Copy)]
pub struct LoraRun {
    pub settings: LoraSettings,
    /// Apply `settings.dropout` (training) or not (evaluation).
    pub training: bool,
    /// Distinguishes the dropout masks of successive micro-batches (see [`lora_dropout_seed`]).
    pub call: u64,
    /// Operand precision of the base-weight matmuls (`matmul_precision`; LoRA pairs stay f32).
    pub precision: MatmulPrecision,
}

/// What [`GpuLinear::forward`] keeps for the backward.
#[derive(Debug, Clone)]
pub struct GpuLinearCache {
    /// `[rows, in]` the input.
    pub x: GpuTensor,
    /// `[rows, r]` `dropout(x)·Aᵀ` when the layer has a pair.
    pub xa: Option<GpuTensor>,
    pub dropout: f32,
    pub seed: u32,
    /// Mask index of `x`'s first element (see [`engine::gpu::Lora::offset`]).
    pub offset: u32,
}

/// A frozen linear layer by canonical module path.
#[derive(Debug, Clone)]
pub struct GpuLinear {
    pub module: String,
    pub weight: BaseWeight,
    /// `[out]` f32.
    pub bias: Option<GpuTensor>,
    pub in_features: usize,
    pub out_features: usize,
    pub lora: Option<GpuLoraPair>,
}

impl GpuLinear {
    /// Uploads `<module>.weight` (dense as `dense` says, or NF4 as stored) and `<module>.bias`
    /// (f32) when asked.
    pub fn from_weights(
        gpu: &Gpu,
        weights: &Weights,
        module: &str,
        with_bias: bool,
        dense: DenseStorage,
    ) -> Result<Self> {
        let name = format!("{module}.weight");
        let (weight, shape) = if weights.is_nf4(&name) {
            let t = weights.nf4(&name)?;
            let shape = [t.shape()[0], t.shape()[1]];
            let absmax = t.absmax_f32();
            let w = gpu
                .upload_nf4(t.packed, &absmax, shape, t.state.blocksize)
                .with_context(|| format!("uploading NF4 `{name}` from {}", t.file.display()))?;
            (BaseWeight::Nf4(w), shape)
        } else {
            let t = weights.tensor(&name)?;
            ensure!(
                t.shape.len() == 2,
                "`{name}` must be 2-D, has shape {:?}",
                t.shape
            );
            let shape = [t.shape[0], t.shape[1]];
            let dtype = dense.device_dtype(t.float_dtype());
            (
                BaseWeight::Dense(upload_tensor(gpu, &t, &shape, dtype)?),
                shape,
            )
        };
        let bias = if with_bias {
            let b = weights.to_f32(&format!("{module}.bias"))?;
            ensure!(
                b.len() == shape[0],
                "`{module}.bias` has {} values, the weight has {} rows",
                b.len(),
                shape[0]
            );
            Some(gpu.upload_f32(&[shape[0]], &b)?)
        } else {
            None
        };
        Ok(Self {
            module: module.to_string(),
            weight,
            bias,
            out_features: shape[0],
            in_features: shape[1],
            lora: None,
        })
    }

    /// `x [rows, in]` (or `[.., in]`) → `y [rows, out]`.
    pub fn forward(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        x: &GpuTensor,
        run: &LoraRun,
    ) -> Result<(GpuTensor, GpuLinearCache)> {
        self.forward_at(gpu, rec, x, run, 0)
    }

    /// [`GpuLinear::forward`] of `x`, rows `first_row..` of a call run in slices: the dropout
    /// mask is the one the whole call draws for these rows (and the cache keeps that offset for
    /// the backward).
    pub fn forward_at(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        x: &GpuTensor,
        run: &LoraRun,
        first_row: usize,
    ) -> Result<(GpuTensor, GpuLinearCache)> {
        let rows = x.numel() / self.in_features;
        ensure!(
            rows * self.in_features == x.numel(),
            "{}: input {:?} is not a multiple of {} features",
            self.module,
            x.shape(),
            self.in_features
        );
        let x2 = x.reshape(&[rows, self.in_features])?;
        let y = gpu.empty(&[rows, self.out_features], DType::F32)?;
        let opts = MatmulOpts {
            trans_b: true,
            bias: self.bias.as_ref(),
            precision: run.precision,
            frozen_b: true,
            ..Default::default()
        };
        match &self.weight {
            BaseWeight::Dense(w) => gpu.matmul(rec, &x2, w, &y, opts)?,
            BaseWeight::Nf4(w) => gpu.matmul_nf4(rec, &x2, w, &y, opts)?,
        }
        let mut cache = GpuLinearCache {
            x: x2.clone(),
            xa: None,
            dropout: 0.0,
            seed: 0,
            offset: 0,
        };
        if let Some(pair) = &self.lora {
            let (xa, p, seed, offset) = self.add_lora(gpu, rec, pair, &x2, &y, run, first_row)?;
            cache.xa = Some(xa);
            cache.dropout = p;
            cache.seed = seed;
            cache.offset = offset;
        }
        Ok((y, cache))
    }

    /// `y += scaling · dropout(x)·Aᵀ·Bᵀ` for rows `first_row..` of the call: returns `x·Aᵀ`
    /// (kept for the backward), the dropout probability, its seed and the mask offset.
    #[allow(clippy::too_many_arguments)]
    fn add_lora(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        pair: &GpuLoraPair,
        x2: &GpuTensor,
        y: &GpuTensor,
        run: &LoraRun,
        first_row: usize,
    ) -> Result<(GpuTensor, f32, u32, u32)> {
        let rows = x2.rows();
        let p = if run.training {
            run.settings.dropout
        } else {
            0.0
        };
        let seed = lora_dropout_seed(run.settings.dropout_seed, &self.module, run.call);
        // The kernel's mask index is a u32 (as the whole call's element index is).
        let offset = u32::try_from(first_row * self.in_features).with_context(|| {
            format!(
                "{}: row {first_row} of {} features is past 2^32 mask elements",
                self.module, self.in_features
            )
        })?;
        let xa = gpu.empty(&[rows, pair.rank()], DType::F32)?;
        let lora = Lora {
            a: &pair.a,
            b: &pair.b,
            scale: run.settings.scaling,
            dropout: p,
            seed,
            offset,
        };
        gpu.lora_forward(rec, x2, &lora, y, &xa)?;
        Ok((xa, p, seed, offset))
    }

    /// The outputs of several layers that read the same `x` (q/k/v, gate/up), for inference
    /// (`run.training` false: no caches): their dense f32 base products in one dispatch where
    /// [`Gpu::matmul_grouped`] can (generation on CPU adapters), then each layer's LoRA pair.
    /// Layers with an NF4 weight or a bias run their own [`GpuLinear::forward`].
    pub fn forward_inference_group(
        gpu: &Gpu,
        rec: &mut Recorder,
        x: &GpuTensor,
        layers: &[&GpuLinear],
        run: &LoraRun,
    ) -> Result<Vec<GpuTensor>> {
        ensure!(
            !run.training,
            "grouped linear forward is for inference only"
        );
        let dense: Option<Vec<&GpuTensor>> = layers
            .iter()
            .map(|l| match (&l.weight, &l.bias) {
                (BaseWeight::Dense(w), None) => Some(w),
                _ => None,
            })
            .collect();
        let in_features = layers.first().map_or(0, |l| l.in_features);
        let (Some(weights), true) = (dense, layers.iter().all(|l| l.in_features == in_features))
        else {
            return layers
                .iter()
                .map(|l| Ok(l.forward(gpu, rec, x, run)?.0))
                .collect();
        };
        let x2 = as_rows(x, in_features)?;
        let rows = x2.rows();
        let outs = layers
            .iter()
            .map(|l| gpu.empty(&[rows, l.out_features], DType::F32))
            .collect::<Result<Vec<_>>>()?;
        gpu.matmul_grouped(
            rec,
            &x2,
            &weights,
            &outs.iter().collect::<Vec<_>>(),
            run.precision,
        )?;
        for (l, y) in layers.iter().zip(&outs) {
            if let Some(pair) = &l.lora {
                l.add_lora(gpu, rec, pair, &x2, y, run, 0)?;
            }
        }
        Ok(outs)
    }

    /// Gemma's gated MLP activation for inference: `gelu(gate(x)) ⊙ up(x)` `[rows, out]`. Dense
    /// layers without bias or LoRA pair take [`Gpu::matmul_geglu`] (on CPU adapters one dispatch
    /// that never writes the two products); otherwise both outputs as
    /// [`GpuLinear::forward_inference_group`] gives them, then [`Gpu::geglu_forward`].
    pub fn forward_inference_geglu(
        gpu: &Gpu,
        rec: &mut Recorder,
        x: &GpuTensor,
        gate: &GpuLinear,
        up: &GpuLinear,
        run: &LoraRun,
    ) -> Result<GpuTensor> {
        fn plain(l: &GpuLinear) -> Option<&GpuTensor> {
            match (&l.weight, &l.bias, &l.lora) {
                (BaseWeight::Dense(w), None, None) => Some(w),
                _ => None,
            }
        }
        if let (Some(g), Some(u), false) = (plain(gate), plain(up), run.training) {
            if gate.in_features == up.in_features && gate.out_features == up.out_features {
                let x2 = as_rows(x, gate.in_features)?;
                let act = gpu.empty(&[x2.rows(), gate.out_features], DType::F32)?;
                gpu.matmul_geglu(rec, &x2, g, u, &act, run.precision)?;
                return Ok(act);
            }
        }
        let outs = Self::forward_inference_group(gpu, rec, x, &[gate, up], run)?;
        let [g, u] = <[GpuTensor; 2]>::try_from(outs).expect("two outputs");
        let act = gpu.empty(g.shape(), DType::F32)?;
        gpu.geglu_forward(rec, &g, &u, &act)?;
        Ok(act)
    }

    /// Accumulates `dA`, `dB` (when the layer has a pair) and returns `dx [rows, in]` when
    /// `need_dx` (the first layer of a frozen stack needs none).
    pub fn backward(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        cache: &GpuLinearCache,
        dy: &GpuTensor,
        run: &LoraRun,
        need_dx: bool,
    ) -> Result<Option<GpuTensor>> {
        let rows = cache.x.rows();
        ensure!(
            dy.numel() == rows * self.out_features,
            "{}: dy {:?} does not match [{rows}, {}]",
            self.module,
            dy.shape(),
            self.out_features
        );
        let dy2 = dy.reshape(&[rows, self.out_features])?;
        let dx = if need_dx {
            let dx = gpu.empty(&[rows, self.in_features], DType::F32)?;
            let opts = MatmulOpts {
                precision: run.precision,
                ..Default::default()
            };
            match &self.weight {
                BaseWeight::Dense(w) => gpu.matmul(rec, &dy2, w, &dx, opts)?,
                BaseWeight::Nf4(w) => gpu.matmul_nf4(rec, &dy2, w, &dx, opts)?,
            }
            Some(dx)
        } else {
            None
        };
        if let Some(pair) = &self.lora {
            let xa = cache
                .xa
                .as_ref()
                .context("LoRA backward without the forward's intermediate")?;
            let lora = Lora {
                a: &pair.a,
                b: &pair.b,
                scale: run.settings.scaling,
                dropout: cache.dropout,
                seed: cache.seed,
                offset: cache.offset,
            };
            // lora_backward adds its dx contribution into `dx` when given.
            gpu.lora_backward(
                rec,
                &cache.x,
                &lora,
                xa,
                &dy2,
                &pair.grad_a,
                &pair.grad_b,
                dx.as_ref(),
                true,
            )?;
        }
        Ok(dx)
    }
}

/// `x` seen as `[rows, in_features]` (the inference products' input).
fn as_rows(x: &GpuTensor, in_features: usize) -> Result<GpuTensor> {
    let rows = x.numel() / in_features.max(1);
    ensure!(
        rows * in_features == x.numel(),
        "input {:?} is not a multiple of {in_features} features",
        x.shape()
    );
    x.reshape(&[rows, in_features])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::lora::{Adapter, AdapterGrads, Linear, LoraCall};
    use engine::gpu::testing::{rel_frobenius, test_gpu, TestRng};
    use std::collections::BTreeMap;

    /// Dense and NF4 bases, with and without dropout, against the reference `Linear`.
    #[test]
    fn linear_with_lora_matches_reference() {
        let gpu = test_gpu();
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        for &(rows, d_in, d_out, r, p, nf4, bias) in &[
            (7usize, 40usize, 24usize, 4usize, 0.0f32, false, true),
            (5, 64, 33, 3, 0.25, false, false),
            (6, 64, 40, 2, 0.1, true, false),
        ] {
            let mut w = rng.vec_normal(d_out * d_in);
            let b = bias.then(|| rng.vec_normal(d_out));
            let mut rec = Recorder::new(gpu);
            let weight = if nf4 {
                // Quantize on the GPU, and give the reference the dequantized weight.
                let dense = gpu.upload_f32(&[d_out, d_in], &w).unwrap();
                let q = gpu.nf4_quantize(&mut rec, &dense, 64).unwrap();
                let deq = gpu.empty(&[d_out, d_in], DType::F32).unwrap();
                gpu.nf4_dequantize(&mut rec, &q, &deq).unwrap();
                std::mem::replace(&mut rec, Recorder::new(gpu))
                    .submit_and_wait()
                    .unwrap();
                w = gpu.read_f32(&deq).unwrap();
                BaseWeight::Nf4(q)
            } else {
                BaseWeight::Dense(gpu.upload_f32(&[d_out, d_in], &w).unwrap())
            };
            let pair = LoraPair {
                a: rng.vec_normal(r * d_in),
                b: rng.vec_normal(d_out * r),
                rank: r,
            };
            let module = "model.language_model.layers.0.self_attn.q_proj".to_string();
            let settings = LoraSettings {
                dropout_seed: 99,
                ..LoraSettings::new(r, 8.0, false, p)
            };
            let adapter = Adapter {
                settings,
                pairs: BTreeMap::from([(module.clone(), pair.clone())]),
                lm_head: None,
                embed_tokens: None,
            };
            let reference = Linear {
                module: module.clone(),
                weight: w.clone(),
                bias: b.clone(),
                in_features: d_in,
                out_features: d_out,
            };
            let linear = GpuLinear {
                module: module.clone(),
                weight,
                bias: b.as_ref().map(|b| gpu.upload_f32(&[d_out], b).unwrap()),
                in_features: d_in,
                out_features: d_out,
                lora: Some(GpuLoraPair::upload(gpu, &pair, d_in, d_out).unwrap()),
            };
            let x = rng.vec_normal(rows * d_in);
            let dy = rng.vec_normal(rows * d_out);
            let call = LoraCall {
                adapter: Some(&adapter),
                training: true,
                call: 3,
            };
            let (y_ref, cache_ref) = reference.forward(&x, &call);
            let mut grads = AdapterGrads::zeros_like(&adapter);
            let dx_ref = reference.backward(&cache_ref, &dy, &call, Some(&mut grads));

            let run = LoraRun {
                settings,
                training: true,
                call: 3,
                precision: MatmulPrecision::F32,
            };
            let xg = gpu.upload_f32(&[rows, d_in], &x).unwrap();
            let dyg = gpu.upload_f32(&[rows, d_out], &dy).unwrap();
            let (y, cache) = linear.forward(gpu, &mut rec, &xg, &run).unwrap();
            let dx = linear
                .backward(gpu, &mut rec, &cache, &dyg, &run, true)
                .unwrap()
                .unwrap();
            rec.submit_and_wait().unwrap();
            let pair_g = linear.lora.as_ref().unwrap();
            let (ga, gb) = &grads.pairs[&module];
            let tol = 1e-5;
            for (what, got, want) in [
                ("y", gpu.read_f32(&y).unwrap(), y_ref.clone()),
                ("dx", gpu.read_f32(&dx).unwrap(), dx_ref.clone()),
                ("dA", gpu.read_f32(&pair_g.grad_a).unwrap(), ga.clone()),
                ("dB", gpu.read_f32(&pair_g.grad_b).unwrap(), gb.clone()),
            ] {
                let e = rel_frobenius(&got, &want);
                assert!(
                    e < tol,
                    "{what} rows {rows} in {d_in} out {d_out} p {p} nf4 {nf4}: rel err {e} (seed {seed})"
                );
            }

            // The same call run in two slices of rows (as the vision tower runs one image at a
            // time): each slice draws the whole call's mask for its rows, so the outputs are
            // the whole call's rows and the gradients sum to the whole call's.
            gpu.fill_f32(&pair_g.grad_a, 0.0).unwrap();
            gpu.fill_f32(&pair_g.grad_b, 0.0).unwrap();
            let split = rows / 2 + 1;
            let mut rec = Recorder::new(gpu);
            let mut outs = Vec::new();
            for (first, end) in [(0, split), (split, rows)] {
                let n = end - first;
                let xs = gpu
                    .upload_f32(&[n, d_in], &x[first * d_in..end * d_in])
                    .unwrap();
                let dys = gpu
                    .upload_f32(&[n, d_out], &dy[first * d_out..end * d_out])
                    .unwrap();
                let (y, cache) = linear.forward_at(gpu, &mut rec, &xs, &run, first).unwrap();
                let dx = linear
                    .backward(gpu, &mut rec, &cache, &dys, &run, true)
                    .unwrap()
                    .unwrap();
                outs.push((y, dx));
            }
            rec.submit_and_wait().unwrap();
            let joined = |pick: fn(&(GpuTensor, GpuTensor)) -> &GpuTensor| {
                outs.iter()
                    .flat_map(|o| gpu.read_f32(pick(o)).unwrap())
                    .collect::<Vec<f32>>()
            };
            for (what, got, want) in [
                ("sliced y", joined(|o| &o.0), &y_ref),
                ("sliced dx", joined(|o| &o.1), &dx_ref),
                ("sliced dA", gpu.read_f32(&pair_g.grad_a).unwrap(), ga),
                ("sliced dB", gpu.read_f32(&pair_g.grad_b).unwrap(), gb),
            ] {
                let e = rel_frobenius(&got, want);
                assert!(
                    e < tol,
                    "{what} rows {rows} in {d_in} out {d_out} p {p} nf4 {nf4}: rel err {e} (seed {seed})"
                );
            }
        }
    }
}
