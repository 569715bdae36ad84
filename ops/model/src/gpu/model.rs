//! `Gemma3ForConditionalGeneration` on the GPU with PEFT LoRA training: scaled embeddings (from
//! the trainable `embed_tokens` copy when the adapter has one), image features written into the
//! image soft-token positions, the decoder stack, the final norm, logits and the fused
//! lm_head + cross-entropy with its backward. The twin of [`crate::reference`]
//! (`Gemma3Reference::forward` / `forward_backward`), which tests it.
//!
//! Gradient checkpointing keeps only each layer's input during the forward (decoder and SigLIP
//! layers, as transformers does) and recomputes the layer (same dropout masks: same
//! [`LoraRun`]) right before its backward. Because a [`Recorder`] keeps every buffer it bound
//! alive until it is submitted, the step flushes the recorder after every layer's forward and
//! backward and after the loss: a buffer dropped in a phase returns to the pool at its end, so
//! the peak is what is kept plus one phase's working set (`model::memory` counts exactly that).

use anyhow::{bail, ensure, Context, Result};

use super::decoder::{GpuDecoderLayer, GpuSequence};
use super::linear::{upload_tensor, DenseStorage, GpuLinear, GpuLoraPair, LoraRun};
use super::projector::{GpuProjector, GpuProjectorCache};
use super::siglip::{GpuVisionCache, GpuVisionTower};
use crate::config::{FloatDtype, ModelConfig};
use crate::memory::BaseFormat;
use crate::names::{EMBED_TOKENS, LM_HEAD, TEXT};
use crate::reference::gemma3::TextDims;
use crate::reference::lora::{Adapter, LoraPair, LoraSettings};
use crate::Weights;
use data::collate::Batch;
use engine::gpu::MatmulPrecision;
use engine::gpu::{DType, Gpu, GpuTensor, MatmulOpts, Recorder};
use engine::reference::attention::image_group_ids;

mod generation;
mod training;

/// How the GPU model trains.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gemma3GpuOptions {
    /// Recompute each decoder layer's forward in the backward, keeping only layer inputs.
    pub gradient_checkpointing: bool,
    /// Scaling, dropout and dropout seed of the LoRA pairs; `None`: the adapter's own settings
    /// (dropout seed 0).
    pub lora: Option<LoraSettings>,
    /// Operand precision of the frozen base's linear layers (`matmul_precision`).
    pub matmul_precision: MatmulPrecision,
    /// `bf16` of lora-train: the vocabulary tables in bf16 storage — the modules_to_save copies
    /// with their gradients and AdamW moments (as torch holds a bf16 model's copies) and the
    /// frozen embedding / lm_head — and the scaled embeddings rounded to bf16 as torch computes
    /// them. Everything else stays f32.
    pub bf16: bool,
    /// How the dense base weights and the frozen vocabulary tables are kept (bf16 checkpoint
    /// tensors stay bf16 by default; always f32 with f16 operands).
    pub dense: DenseStorage,
}

/// A trainable full tensor (a `modules_to_save` copy) and its gradient, `[vocab, hidden]`, both
/// f32 or both bf16.
#[derive(Debug, Clone)]
pub struct TrainedTable {
    pub value: GpuTensor,
    pub grad: GpuTensor,
}

/// The vocabulary tables' dtype ([`Gemma3GpuOptions::bf16`]).
fn table_dtype(bf16: bool) -> DType {
    if bf16 {
        DType::BF16
    } else {
        DType::F32
    }
}

/// The dtype of a frozen vocabulary table stored in `stored`: bf16 under `bf16`, or where
/// `dense` keeps the checkpoint's bf16 (its values exactly, at half the size: the output
/// projection is the largest product of a decode step); f32 otherwise. The products that read
/// it take f32 operands whatever `matmul_precision` says.
fn frozen_table_dtype(bf16: bool, dense: DenseStorage, stored: Option<FloatDtype>) -> DType {
    table_dtype(bf16 || dense.device_dtype(stored) == DType::BF16)
}

impl TrainedTable {
    fn upload(
        gpu: &Gpu,
        values: &[f32],
        shape: [usize; 2],
        what: &str,
        bf16: bool,
    ) -> Result<Self> {
        ensure!(
            values.len() == shape[0] * shape[1],
            "the adapter's {what} copy has {} values, the model needs {:?}",
            values.len(),
            shape
        );
        let value = gpu.upload_f32_as(&shape, values, table_dtype(bf16))?;
        let grad = gpu.empty(&shape, value.dtype())?;
        gpu.zero(&[&grad]);
        Ok(Self { value, grad })
    }
}

/// Activation bytes the last [`TrainModel::accumulate`] kept between its forward and backward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActivationBytes {
    /// Layer caches (without checkpointing) or layer inputs (with it).
    pub kept: u64,
    /// What the layer caches would hold without checkpointing (computed either way).
    pub full: u64,
}

/// The GPU model (frozen base + trainable adapter tensors).
pub struct Gemma3Gpu {
    pub dims: TextDims,
    /// `[vocab, hidden]` frozen base embedding (also the tied lm_head), f32 or bf16; not on the
    /// device when the adapter's trainable copies replace it in both roles (the copies are
    /// what every forward reads: 2.5 GiB of f32 at Gemma 3 4B's vocabulary).
    pub embed_tokens: Option<GpuTensor>,
    /// `sqrt(hidden)` rounded to the embedding's dtype.
    pub embed_scale: f32,
    pub layers: Vec<GpuDecoderLayer>,
    /// SigLIP tower and projector (`Gemma3ForConditionalGeneration`; none for a text-only model).
    pub vision: Option<GpuVisionTower>,
    pub projector: Option<GpuProjector>,
    /// `[hidden]`.
    pub final_norm: GpuTensor,
    /// `[vocab, hidden]` when the checkpoint has its own (untied) lm_head.
    pub lm_head: Option<GpuTensor>,
    /// The adapter's trainable `embed_tokens` copy.
    pub embed_copy: Option<TrainedTable>,
    /// The adapter's trainable `lm_head` copy.
    pub lm_head_copy: Option<TrainedTable>,
    pub image_token_index: Option<i64>,
    pub mm_tokens_per_image: usize,
    /// `padding_idx` of the embedding: its row never receives a gradient.
    pub pad_token_id: Option<i64>,
    pub settings: LoraSettings,
    pub gradient_checkpointing: bool,
    /// Operand precision of the base's linear layers.
    pub matmul_precision: MatmulPrecision,
    /// The vocabulary tables in bf16 ([`Gemma3GpuOptions::bf16`]).
    pub bf16: bool,
    /// Filled by every [`TrainModel::accumulate`].
    pub last_activation_bytes: ActivationBytes,
}

/// Per-batch host-side inputs.
struct Prepared {
    ctx: GpuSequence,
    /// `[tokens]` u32 input ids.
    ids: GpuTensor,
    /// `[tokens]` ids for the embedding gradient: image soft tokens (overwritten by the image
    /// features) as `u32::MAX`, which matches no row.
    grad_ids: Vec<u32>,
    /// `[images, channels, size, size]` when the batch has images.
    pixels: Option<GpuTensor>,
    /// Flattened token index of the first soft token of each image (each run is
    /// `mm_tokens_per_image` long, in image order: transformers' `masked_scatter` order).
    image_starts: Vec<usize>,
}

/// What the image path keeps for the backward.
struct ImageCache {
    vision: GpuVisionCache,
    projector: GpuProjectorCache,
}

impl Gemma3Gpu {
    /// The model of a `model` input (its folder `root`, dense or NF4) for inference — no
    /// checkpointing, no dropout — with the adapter in `adapter_dir` checked against it (a
    /// mismatch is named) and attached: what `eval` and `generate` run. Errors say which step
    /// failed; the op adds its name.
    pub fn for_inference(
        gpu: &Gpu,
        root: &std::path::Path,
        config: &ModelConfig,
        adapter_dir: Option<&std::path::Path>,
        matmul_precision: MatmulPrecision,
        bf16: bool,
    ) -> Result<Self> {
        let weights = Weights::open(root, config)?;
        let adapter = match adapter_dir {
            Some(dir) => {
                crate::peft::check_against_base(dir, config)?;
                Some(Adapter::load(dir)?)
            }
            None => None,
        };
        Self::from_weights(
            gpu,
            config,
            &weights,
            adapter.as_ref(),
            Gemma3GpuOptions {
                gradient_checkpointing: false,
                lora: adapter.as_ref().map(|a| a.settings),
                matmul_precision,
                bf16,
                dense: DenseStorage::AsStored,
            },
        )
        .context("loading the model")
    }

    /// Uploads the frozen model; attaches `adapter`'s LoRA pairs (by canonical module path) and
    /// its modules_to_save copies (lm_head / embed_tokens, trainable, untied).
    pub fn from_weights(
        gpu: &Gpu,
        config: &ModelConfig,
        weights: &Weights,
        adapter: Option<&Adapter>,
        opts: Gemma3GpuOptions,
    ) -> Result<Self> {
        let t = config.text();
        if t.final_logit_softcapping.is_some() || t.attn_logit_softcapping.is_some() {
            bail!("logit soft-capping is not implemented (Gemma 3 sets none)");
        }
        if t.hidden_activation != "gelu_pytorch_tanh" {
            bail!(
                "hidden_activation `{}` is not supported (gelu_pytorch_tanh)",
                t.hidden_activation
            );
        }
        let dims = TextDims {
            hidden: t.hidden_size,
            intermediate: t.intermediate_size,
            heads: t.num_attention_heads,
            kv_heads: t.num_key_value_heads,
            head_dim: t.head_dim(),
            vocab: t.vocab_size,
            rms_eps: t.rms_norm_eps as f32,
            attn_scale: t.attn_scale() as f32,
        };
        let table_shape = [dims.vocab, dims.hidden];
        let dense = opts.dense.for_precision(opts.matmul_precision);
        let embed = weights.tensor(EMBED_TOKENS)?;
        // torch multiplies by the normalizer in the embedding's dtype (bf16 under `bf16`)
        let embed_scale = t.embed_scale(if opts.bf16 {
            FloatDtype::BF16
        } else {
            embed.float_dtype().unwrap_or(FloatDtype::F32)
        });
        // The frozen table is read only where no trainable copy stands in: as the input
        // embedding without an embed_tokens copy, as the output projection (tied) without an
        // lm_head copy.
        let untied_head = !config.tie_word_embeddings() && weights.contains(LM_HEAD);
        let replaced = adapter
            .is_some_and(|a| a.embed_tokens.is_some() && (a.lm_head.is_some() || untied_head));
        let embed_tokens = if replaced {
            None
        } else {
            let dtype = frozen_table_dtype(opts.bf16, dense, embed.float_dtype());
            Some(upload_tensor(gpu, &embed, &table_shape, dtype)?)
        };
        let layers = (0..t.num_hidden_layers)
            .map(|l| {
                GpuDecoderLayer::from_weights(gpu, config, weights, l, dense)
                    .with_context(|| format!("decoder layer {l}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let final_norm_host = weights.to_f32(&format!("{TEXT}norm.weight"))?;
        let final_norm = gpu.upload_f32(&[dims.hidden], &final_norm_host)?;
        let lm_head = if untied_head && adapter.is_none_or(|a| a.lm_head.is_none()) {
            let head = weights.tensor(LM_HEAD)?;
            let dtype = frozen_table_dtype(opts.bf16, dense, head.float_dtype());
            Some(upload_tensor(gpu, &head, &table_shape, dtype)?)
        } else {
            None
        };
        let (image_token_index, mm_tokens_per_image) = match config {
            ModelConfig::ConditionalGeneration(g) => {
                (Some(g.image_token_index), g.mm_tokens_per_image)
            }
            _ => (None, 0),
        };
        let (vision, projector) = match config {
            ModelConfig::ConditionalGeneration(_) => (
                Some({
                    let mut tower = GpuVisionTower::from_weights(gpu, config, weights, dense)
                        .context("vision tower")?;
                    tower.bf16 = opts.bf16;
                    tower
                }),
                Some(GpuProjector::from_weights(gpu, config, weights).context("projector")?),
            ),
            _ => (None, None),
        };
        let settings = opts
            .lora
            .or(adapter.map(|a| a.settings))
            .unwrap_or(LoraSettings::new(1, 1.0, false, 0.0));
        let mut model = Self {
            dims,
            embed_tokens,
            embed_scale,
            layers,
            vision,
            projector,
            final_norm,
            lm_head,
            embed_copy: None,
            lm_head_copy: None,
            image_token_index,
            mm_tokens_per_image,
            pad_token_id: t.pad_token_id,
            settings,
            gradient_checkpointing: opts.gradient_checkpointing,
            matmul_precision: opts.matmul_precision,
            bf16: opts.bf16,
            last_activation_bytes: ActivationBytes::default(),
        };
        if let Some(adapter) = adapter {
            model.attach(gpu, adapter)?;
        }
        Ok(model)
    }

    /// What [`Gemma3Gpu::from_weights`] keeps of `weights` under `opts`, for the memory plan:
    /// the linears' format (NF4 as stored with the absmax widened to f32; dense in f32, or bf16
    /// where a bf16 checkpoint is kept as stored) and the frozen vocabulary tables' dtype.
    pub fn device_storage(
        config: &ModelConfig,
        weights: &Weights,
        opts: &Gemma3GpuOptions,
    ) -> Result<(BaseFormat, FloatDtype)> {
        let dense = opts.dense.for_precision(opts.matmul_precision);
        let to_float = |d: DType| match d {
            DType::BF16 => FloatDtype::BF16,
            _ => FloatDtype::F32,
        };
        let linears: Vec<_> = crate::names::expected_tensors(config)
            .into_iter()
            .filter(|e| e.kind == crate::names::TensorKind::LinearWeight)
            .collect();
        let base = if linears.iter().any(|e| weights.is_nf4(&e.name)) {
            BaseFormat::Nf4 {
                double_quant: false,
            }
        } else {
            let first = linears.first().context("the model has no linear layer")?;
            let stored = weights.tensor(&first.name)?.float_dtype();
            BaseFormat::Dense(to_float(dense.device_dtype(stored)))
        };
        let stored = weights.tensor(EMBED_TOKENS)?.float_dtype();
        let tables = to_float(frozen_table_dtype(opts.bf16, dense, stored));
        Ok((base, tables))
    }

    fn linears(&self) -> impl Iterator<Item = &GpuLinear> {
        self.layers
            .iter()
            .flat_map(|l| l.linears())
            .chain(self.vision.iter().flat_map(|v| v.linears()))
    }

    fn attach(&mut self, gpu: &Gpu, adapter: &Adapter) -> Result<()> {
        let shape = [self.dims.vocab, self.dims.hidden];
        for (module, pair) in &adapter.pairs {
            let linear = self
                .layers
                .iter_mut()
                .flat_map(|l| l.linears_mut())
                .chain(self.vision.iter_mut().flat_map(|v| v.linears_mut()))
                .find(|l| &l.module == module);
            let Some(linear) = linear else {
                bail!(
                    "the adapter has a LoRA pair for `{module}`, which is no linear layer of the model"
                );
            };
            linear.lora = Some(
                GpuLoraPair::upload(gpu, pair, linear.in_features, linear.out_features)
                    .with_context(|| format!("adapter pair `{module}`"))?,
            );
        }
        if let Some(v) = &adapter.embed_tokens {
            self.embed_copy = Some(TrainedTable::upload(
                gpu,
                v,
                shape,
                "embed_tokens",
                self.bf16,
            )?);
        }
        if let Some(v) = &adapter.lm_head {
            self.lm_head_copy = Some(TrainedTable::upload(gpu, v, shape, "lm_head", self.bf16)?);
        }
        Ok(())
    }

    /// The embedding table in use: the trainable copy, else the base.
    fn input_embedding(&self) -> Result<&GpuTensor> {
        self.embed_copy
            .as_ref()
            .map(|c| &c.value)
            .or(self.embed_tokens.as_ref())
            .context("no input embedding on the device")
    }

    /// The output projection in use: the trainable copy, else the checkpoint's lm_head, else
    /// the (frozen, base) tied embedding.
    fn output_embedding(&self) -> Result<&GpuTensor> {
        self.lm_head_copy
            .as_ref()
            .map(|c| &c.value)
            .or(self.lm_head.as_ref())
            .or(self.embed_tokens.as_ref())
            .context("no output projection on the device")
    }

    fn prepare(&self, gpu: &Gpu, batch: &Batch) -> Result<Prepared> {
        let (bsz, seq) = (batch.batch_size, batch.seq_len);
        let n = bsz * seq;
        for (name, len) in [
            ("input_ids", batch.input_ids.len()),
            ("attention_mask", batch.attention_mask.len()),
            ("token_type_ids", batch.token_type_ids.len()),
            ("labels", batch.labels.len()),
        ] {
            ensure!(
                len == n,
                "{name} has {len} entries, expected batch x seq = {n}"
            );
        }
        if let Some((i, id)) = batch
            .input_ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id < 0 || id as usize >= self.dims.vocab)
        {
            bail!(
                "input_ids[{}][{}] = {id} is outside the vocabulary ({})",
                i / seq,
                i % seq,
                self.dims.vocab
            );
        }
        let image_tokens = batch
            .input_ids
            .iter()
            .filter(|&&id| Some(id) == self.image_token_index)
            .count();
        // Soft-token runs: one run of mm_tokens_per_image per image, in image order.
        let mut image_starts = Vec::new();
        let mut t = 0;
        while t < n {
            if Some(batch.input_ids[t]) == self.image_token_index {
                let start = t;
                while t < n && Some(batch.input_ids[t]) == self.image_token_index {
                    t += 1;
                }
                ensure!(
                    t - start == self.mm_tokens_per_image,
                    "row {}: a run of {} image soft tokens at position {}; each image has exactly \
                     mm_tokens_per_image = {}",
                    start / seq,
                    t - start,
                    start % seq,
                    self.mm_tokens_per_image
                );
                image_starts.push(start);
            } else {
                t += 1;
            }
        }
        ensure!(
            image_starts.len() == batch.num_images,
            "the batch has {image_tokens} image soft tokens ({} images' worth) but {} images",
            image_starts.len(),
            batch.num_images
        );
        let pixels = if batch.num_images > 0 {
            ensure!(
                self.vision.is_some() && self.projector.is_some(),
                "the batch has images but the model has no vision tower"
            );
            let (h, w) = (batch.image_height, batch.image_width);
            ensure!(
                batch.pixel_values.len() == batch.num_images * 3 * h * w,
                "pixel_values hold {} values, expected {} images x 3 x {h} x {w}",
                batch.pixel_values.len(),
                batch.num_images
            );
            Some(gpu.upload_f32(&[batch.num_images, 3, h, w], &batch.pixel_values)?)
        } else {
            None
        };
        let tt: Vec<u32> = batch.token_type_ids.iter().map(|&v| v as u32).collect();
        let groups = image_group_ids(&tt, bsz, seq)?;
        let key_padding: Vec<u32> = batch.attention_mask.iter().map(|&v| v as u32).collect();
        let ctx = GpuSequence::new(
            gpu,
            &self.dims,
            bsz,
            seq,
            &groups,
            &key_padding,
            &self.layers,
        )?;
        let ids: Vec<u32> = batch.input_ids.iter().map(|&i| i as u32).collect();
        let grad_ids = batch
            .input_ids
            .iter()
            .map(|&i| {
                if Some(i) == self.image_token_index {
                    u32::MAX
                } else {
                    i as u32
                }
            })
            .collect();
        Ok(Prepared {
            ctx,
            ids: gpu.upload_u32(&[n], &ids)?,
            grad_ids,
            pixels,
            image_starts,
        })
    }

    /// Scaled embeddings `[tokens, hidden]` with the image features merged in.
    fn embed(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        p: &Prepared,
        run: &LoraRun,
    ) -> Result<(GpuTensor, Option<ImageCache>)> {
        let tokens = p.ids.numel();
        let x = gpu.empty(&[tokens, self.dims.hidden], DType::F32)?;
        gpu.embedding_gather(
            rec,
            self.input_embedding()?,
            &p.ids,
            &x,
            self.embed_scale,
            self.bf16,
        )?;
        let Some(pixels) = &p.pixels else {
            return Ok((x, None));
        };
        let (vision, projector) = (
            self.vision.as_ref().context("no vision tower")?,
            self.projector.as_ref().context("no projector")?,
        );
        let (vision_out, vision_cache) =
            vision.forward(gpu, rec, pixels, run, self.gradient_checkpointing)?;
        let (features, projector_cache) =
            projector.forward(gpu, rec, &vision_out, p.image_starts.len())?;
        // The features replace the soft tokens' (scaled) embeddings, unscaled.
        let mm = self.mm_tokens_per_image;
        for (image, &start) in p.image_starts.iter().enumerate() {
            gpu.copy_rows(rec, &features, image * mm, &x, start, mm)?;
        }
        // A tower without LoRA pairs trains nothing: the image path keeps nothing.
        let cache = vision.has_lora().then_some(ImageCache {
            vision: vision_cache,
            projector: projector_cache,
        });
        drop((vision_out, features));
        rec.flush();
        Ok((x, cache))
    }

    /// Under `bf16`: rounds a decoder layer's input `[tokens, hidden]` to bf16 in place (torch's
    /// bf16 model passes bf16 hidden states between layers) and returns the bf16 copy, which a
    /// checkpointed step keeps instead of the f32 input. `None` in f32.
    fn round_layer_input(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        x: &GpuTensor,
    ) -> Result<Option<GpuTensor>> {
        self.bf16.then(|| gpu.round_to_bf16(rec, x)).transpose()
    }

    /// Final-normed hidden states `[tokens, hidden]` without caches (evaluation).
    fn forward_normed(&self, gpu: &Gpu, rec: &mut Recorder, batch: &Batch) -> Result<GpuTensor> {
        let p = self.prepare(gpu, batch)?;
        let run = LoraRun {
            settings: self.settings,
            training: false,
            call: 0,
            precision: self.matmul_precision,
        };
        let (mut x, _) = self.embed(gpu, rec, &p, &run)?;
        for (i, layer) in self.layers.iter().enumerate() {
            self.round_layer_input(gpu, rec, &x)?;
            let (y, _) = layer
                .forward(gpu, rec, &x, &self.dims, &p.ctx, &run)
                .with_context(|| format!("decoder layer {i}"))?;
            x = y;
        }
        let normed = gpu.empty(x.shape(), DType::F32)?;
        let rstd = gpu.empty(&[x.rows()], DType::F32)?;
        gpu.rmsnorm_forward(rec, &x, &self.final_norm, &normed, &rstd, self.dims.rms_eps)?;
        Ok(normed)
    }

    /// Logits `[batch, seq, vocab]` (evaluation: no dropout) — for tests and the eval op.
    pub fn logits(&self, gpu: &Gpu, batch: &Batch) -> Result<Vec<f32>> {
        let mut rec = Recorder::new(gpu);
        let normed = self.forward_normed(gpu, &mut rec, batch)?;
        let logits = gpu.empty(&[normed.rows(), self.dims.vocab], DType::F32)?;
        // only generation calls this: the output embedding does not change meanwhile
        let opts = MatmulOpts {
            trans_b: true,
            frozen_b: true,
            ..Default::default()
        };
        gpu.matmul(&mut rec, &normed, self.output_embedding()?, &logits, opts)?;
        rec.submit_and_wait()?;
        gpu.read_f32(&logits)
    }

    /// The current trainable tensors read back as a reference `Adapter` (for saving).
    pub fn to_adapter(&self, gpu: &Gpu) -> Result<Adapter> {
        let mut pairs = std::collections::BTreeMap::new();
        for lin in self.linears() {
            if let Some(p) = &lin.lora {
                pairs.insert(
                    lin.module.clone(),
                    LoraPair {
                        a: gpu.read_f32(&p.a)?,
                        b: gpu.read_f32(&p.b)?,
                        rank: p.rank(),
                    },
                );
            }
        }
        let read = |t: &Option<TrainedTable>| -> Result<Option<Vec<f32>>> {
            t.as_ref().map(|c| gpu.read_f32(&c.value)).transpose()
        };
        Ok(Adapter {
            settings: self.settings,
            pairs,
            lm_head: read(&self.lm_head_copy)?,
            embed_tokens: read(&self.embed_copy)?,
        })
    }
}
