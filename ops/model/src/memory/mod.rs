//! The device memory plan: the bytes a model will take on the device before anything is
//! uploaded — frozen weights by dtype (NF4 packed codes and their quantization state, bf16/f32
//! tensors), the trainable LoRA weights with their gradients and AdamW states, the
//! modules_to_save copies, and the activations of one micro-batch (with or without gradient
//! checkpointing) — printed as a table and refused with a clear error when it exceeds the
//! adapter's limits.
//!
//! Activation figures follow what `Gemma3Gpu::accumulate` (ops/model/src/gpu) allocates, buffer
//! by buffer: flash attention (an lse per row, no probabilities), the fused lm_head +
//! cross-entropy with a bounded logits block, the recorder keeping every bound buffer until its
//! next flush (one per layer and phase), the engine's pool size classes. The
//! tiny-model test (ops/tests/memory_plan.rs) checks them against the engine's own count.
//! Activations are bound whole by their kernels, so one larger than a storage binding is
//! refused here, before anything is uploaded; only weights are split into chunks.
//!
//! A data-parallel step's gradient all-reduce (`train::grad_sync`) adds nothing here: it
//! copies each gradient bucket into a mappable readback buffer, which wgpu places in host
//! memory outside the engine's pool, and sums it on the host. [`allreduce_payload`] gives the
//! bytes it moves.

use std::fmt::Write as _;

use anyhow::{bail, Context, Result};

use super::config::{FloatDtype, ModelConfig};
use super::names::{expected_tensors, ExpectedTensor, TensorKind, EMBED_TOKENS, LM_HEAD, VISION};
use engine::gpu::engine::pooled_capacity;
use engine::gpu::kernels::attention::mask_word_count;
use engine::gpu::kernels::cross_entropy::{bf16_dw_rows, logits_block, LOGITS_SCRATCH_BYTES};
use engine::gpu::staging::{texture_bytes, texture_rows, STAGING_TEXTURES};

mod activations;
mod alloc;
mod layers;
mod report;
#[cfg(test)]
mod tests;
mod tower;

use activations::*;
use alloc::*;
use layers::*;
pub use tower::vision_tower_peak;
use tower::*;

/// How the frozen base's Linear weights are stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BaseFormat {
    /// bitsandbytes NF4, blocksize 64, with or without double quantization of the absmax.
    Nf4 { double_quant: bool },
    /// Dense in this dtype (no quantization).
    Dense(FloatDtype),
}

/// The LoRA setup the plan counts (PEFT `all-linear`: every Linear except lm_head).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPlan {
    pub r: usize,
    /// Trainable full copies, by module name (`lm_head`, `embed_tokens`).
    pub modules_to_save: Vec<String>,
    /// dtype of the modules_to_save copies and their grads / AdamW states (TRL 0.21 keeps them bf16).
    pub modules_to_save_dtype: FloatDtype,
    /// Pairs on the vision tower's linears too (PEFT `all-linear`), not only the text decoder's.
    pub vision: bool,
    /// LoRA dropout > 0: every LoRA forward and backward draws a dropped-out copy of its input.
    pub dropout: bool,
    /// `optim = "adamw_offload"`: the modules_to_save copies' AdamW moments live on the host.
    pub optimizer_offload: bool,
}

/// One micro-batch's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivationPlan {
    pub batch: usize,
    /// Padded sequence length (image soft tokens included).
    pub seq_len: usize,
    pub images_per_sample: usize,
    pub gradient_checkpointing: bool,
    pub activation_dtype: FloatDtype,
    /// The engine's largest storage binding (`Gpu::max_binding_bytes`): sizes the fused
    /// cross-entropy's logits block.
    pub max_binding_bytes: u64,
    /// The adapter stages kernel operands in textures (`Gpu::stages_operands`: CPU adapters).
    pub staged_operands: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    pub base: BaseFormat,
    /// dtype of the tensors that are not quantized (embeddings, norms, biases, projector).
    pub base_dtype: FloatDtype,
    /// dtype of the frozen vocabulary tables (embed_tokens, an untied lm_head) on the device:
    /// bf16 under lora-train's `bf16` or where a bf16 checkpoint's tables are kept as stored
    /// (`Gemma3Gpu::device_storage`).
    pub frozen_tables: FloatDtype,
    pub lora: Option<LoraPlan>,
    pub activations: Option<ActivationPlan>,
}

/// The adapter limits the plan is checked against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceLimits {
    /// wgpu `Limits::max_buffer_size`.
    pub max_buffer_size: u64,
    /// wgpu `Limits::max_storage_buffer_binding_size`.
    pub max_storage_buffer_binding_size: u64,
    /// Device memory the run may use (wgpu does not report it: the user or adapter table gives it).
    pub memory_budget: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlanRow {
    /// `weights`, `trainable` or `activations`.
    pub part: &'static str,
    pub item: String,
    pub dtype: &'static str,
    pub elements: u64,
    /// Bytes of the data.
    pub bytes: u64,
    /// What the GPU engine allocates for it (its buffer pool rounds each buffer up to a size
    /// class, ≤ 25% more).
    pub device_bytes: u64,
}

/// One buffer the engine must allocate.
#[derive(Debug, Clone, PartialEq)]
pub struct Buffer {
    pub name: String,
    pub bytes: u64,
    /// Bytes of one row: a chunked buffer is split between rows.
    pub row_bytes: u64,
    /// Weights are split between rows into several bindings and their kernels loop over the
    /// chunks; activations must fit one binding (their kernels bind them whole).
    pub chunkable: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    pub rows: Vec<PlanRow>,
    /// Every distinct buffer, largest first.
    pub buffers: Vec<Buffer>,
    /// `(batch, seq_len, images_per_sample)` of the planned micro-batch (for error messages).
    pub batch_shape: Option<(usize, usize, usize)>,
}

/// The KV cache `generate` holds (`model::gpu::kv_cache`): per decoder layer one f32 tensor of
/// keys and one of values, `[batch, kv_heads, capacity, head_dim]`, where a sliding-window
/// layer's capacity is its window and a full-attention layer's every position, `max_len` =
/// prompt + `max_new_tokens`. Device bytes at the pool's size classes, split into row chunks
/// past `max_binding` as the engine splits them.
pub fn kv_cache_row(
    config: &ModelConfig,
    batch: usize,
    max_len: usize,
    max_binding: u64,
) -> PlanRow {
    let t = config.text();
    let (mut elements, mut device) = (0u64, 0u64);
    for layer in 0..t.num_hidden_layers {
        let capacity = match t.sliding_window() {
            Some(window) if t.is_sliding(layer) => window,
            _ => max_len,
        };
        let row = (t.num_key_value_heads * capacity * t.head_dim()) as u64;
        let n = batch as u64 * row;
        elements += 2 * n;
        device += 2 * chunked_capacity(4 * n, 4 * row, max_binding);
    }
    PlanRow {
        part: "kv cache",
        item: format!(
            "KV cache: keys and values of {} layers, {batch} x {max_len} positions (sliding layers: their window)",
            t.num_hidden_layers
        ),
        dtype: "f32",
        elements,
        bytes: elements * 4,
        device_bytes: device,
    }
}

/// Bytes of one NF4 linear of `n` values: packed codes, absmax, and (double quant) the nested
/// absmax, the offset and the two code tables, as bitsandbytes keeps them per weight.
pub fn nf4_state_bytes(n: u64, double_quant: bool) -> (u64, u64) {
    let packed = n.div_ceil(2);
    let blocks = n.div_ceil(64);
    let state = if double_quant {
        blocks + 4 * blocks.div_ceil(256) + 4 + 16 * 4 + 256 * 4
    } else {
        4 * blocks + 16 * 4
    };
    (packed, state)
}

/// What transformers' `get_memory_footprint(return_buffers=False)` reports for the model loaded
/// with bitsandbytes NF4: parameters only, each 4-bit Linear as its packed uint8 parameter
/// (`ceil(n/2)` bytes; absmax and the rest of the quant state are not parameters), other
/// parameters in `dtype`, tied lm_head counted once.
pub fn bnb_parameter_footprint(config: &ModelConfig, dtype: FloatDtype) -> u64 {
    expected_tensors(config)
        .iter()
        .filter(|e| !(e.optional && e.kind == TensorKind::OutputEmbedding))
        .map(|e| match e.kind {
            TensorKind::LinearWeight => (e.numel() as u64).div_ceil(2),
            _ => e.numel() as u64 * dtype.size() as u64,
        })
        .sum()
}

/// Device bytes of a weight tensor of `bytes` in rows of `row_bytes`: the engine splits one
/// larger than a binding into chunks of whole rows on 32-bit boundaries
/// (`Gpu::rows_per_chunk`), each its own pooled buffer, so it costs the size classes of its
/// chunks (a 2.5 GiB table in 128 MiB chunks costs 2.5 GiB, not the 3 GiB class of its total).
fn chunked_capacity(bytes: u64, row_bytes: u64, max_binding: u64) -> u64 {
    let row_bits = row_bytes * 8;
    if bytes <= max_binding || row_bits == 0 || row_bytes > max_binding {
        return pooled_capacity(bytes.next_multiple_of(4));
    }
    let mut per = max_binding * 8 / row_bits;
    while per > 0 && !(per * row_bits).is_multiple_of(32) {
        per -= 1;
    }
    let rows = bytes / row_bytes;
    if per == 0 || rows <= per {
        return pooled_capacity(bytes.next_multiple_of(4));
    }
    let full = rows / per;
    let last = (rows - full * per) * row_bytes;
    full * pooled_capacity(per * row_bytes)
        + if last > 0 {
            pooled_capacity(last.next_multiple_of(4))
        } else {
            0
        }
}

fn human(bytes: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let b = bytes as f64;
    if b >= GIB {
        format!("{:.2} GiB", b / GIB)
    } else if b >= MIB {
        format!("{:.1} MiB", b / MIB)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// The bytes one rank gives to a data-parallel step's gradient all-reduce
/// (`train::grad_sync`), by part: every LoRA value in f32, the lm_head copy whole, and
/// `embed_rows` rows of the embed_tokens copy (the rows the step's tokens touch over all
/// ranks), the copies in their dtype. The step also gathers 16 bytes per micro-batch and 4 per
/// embedding row of counts and row ids, which the trainer's printed figure includes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllreducePayload {
    pub lora: u64,
    pub lm_head: u64,
    pub embed_tokens: u64,
}

impl AllreducePayload {
    pub fn total(&self) -> u64 {
        self.lora + self.lm_head + self.embed_tokens
    }
}

pub fn allreduce_payload(
    config: &ModelConfig,
    lora: &LoraPlan,
    embed_rows: u64,
) -> Result<AllreducePayload> {
    let plan = MemoryPlan::build(
        config,
        &PlanOptions {
            base: BaseFormat::Nf4 { double_quant: true },
            base_dtype: FloatDtype::BF16,
            frozen_tables: FloatDtype::BF16,
            lora: Some(lora.clone()),
            activations: None,
        },
    )?;
    let lora_values: u64 = plan
        .rows
        .iter()
        .filter(|r| r.item.starts_with("LoRA A+B"))
        .map(|r| r.elements)
        .sum();
    let text = config.text();
    let row = text.hidden_size as u64 * lora.modules_to_save_dtype.size() as u64;
    let has = |m: &str| lora.modules_to_save.iter().any(|x| x == m);
    Ok(AllreducePayload {
        lora: 4 * lora_values,
        lm_head: if has("lm_head") {
            text.vocab_size as u64 * row
        } else {
            0
        },
        embed_tokens: if has("embed_tokens") {
            embed_rows.min(text.vocab_size as u64) * row
        } else {
            0
        },
    })
}

impl MemoryPlan {
    pub fn build(config: &ModelConfig, opts: &PlanOptions) -> Result<Self> {
        let tensors = expected_tensors(config);
        let mut rows = Vec::new();
        let mut buffers = Vec::new();
        let lin: Vec<&ExpectedTensor> = tensors
            .iter()
            .filter(|e| e.kind == TensorKind::LinearWeight)
            .collect();
        let lin_elems: u64 = lin.iter().map(|e| e.numel() as u64).sum();
        let row_of =
            |e: &ExpectedTensor| -> u64 { e.shape.iter().skip(1).product::<usize>().max(1) as u64 };
        // The binding the engine chunks weights at (no activations planned: unchunked).
        let binding = opts
            .activations
            .as_ref()
            .map_or(u64::MAX, |a| a.max_binding_bytes);
        let dev = |bytes: u64, row_bytes: u64| chunked_capacity(bytes, row_bytes, binding);

        // Frozen base (weights are split between rows into chunks when larger than a binding).
        match opts.base {
            BaseFormat::Nf4 { double_quant } => {
                let (mut packed, mut state) = (0, 0);
                let (mut packed_dev, mut state_dev) = (0, 0);
                for e in &lin {
                    let n = e.numel() as u64;
                    let (p, s) = nf4_state_bytes(n, double_quant);
                    packed += p;
                    state += s;
                    // Both are uploaded flat (`Gpu::upload_nf4`): rows of one byte, one f32.
                    packed_dev += dev(p, 1);
                    // The GPU holds the absmax widened to f32.
                    state_dev += dev(4 * n.div_ceil(64), 4);
                    buffers.push(Buffer {
                        name: e.name.clone(),
                        bytes: p,
                        row_bytes: row_of(e).div_ceil(2),
                        chunkable: true,
                    });
                }
                rows.push(PlanRow {
                    part: "weights",
                    item: format!("{} Linear weights, NF4 packed codes", lin.len()),
                    dtype: "nf4",
                    elements: lin_elems,
                    bytes: packed,
                    device_bytes: packed_dev,
                });
                rows.push(PlanRow {
                    part: "weights",
                    item: if double_quant {
                        "NF4 state: absmax (u8) + nested absmax (f32) + offsets + code tables (GPU: absmax f32)"
                            .into()
                    } else {
                        "NF4 state: absmax (f32) + code table".into()
                    },
                    dtype: if double_quant { "u8/f32" } else { "f32" },
                    elements: lin_elems.div_ceil(64),
                    bytes: state,
                    device_bytes: state_dev,
                });
            }
            BaseFormat::Dense(d) => {
                let mut on_device = 0;
                for e in &lin {
                    let bytes = e.numel() as u64 * d.size() as u64;
                    on_device += dev(bytes, row_of(e) * d.size() as u64);
                    buffers.push(Buffer {
                        name: e.name.clone(),
                        bytes,
                        row_bytes: row_of(e) * d.size() as u64,
                        chunkable: true,
                    });
                }
                rows.push(PlanRow {
                    part: "weights",
                    item: format!("{} Linear weights", lin.len()),
                    dtype: d.name(),
                    elements: lin_elems,
                    bytes: lin_elems * d.size() as u64,
                    device_bytes: on_device,
                });
            }
        }
        let bd = opts.base_dtype.size() as u64;
        let others: Vec<&ExpectedTensor> = tensors
            .iter()
            .filter(|e| {
                e.kind == TensorKind::Other
                    || (e.kind == TensorKind::OutputEmbedding && !e.optional)
            })
            .collect();
        // The frozen vocabulary tables are stored in `frozen_tables`, and not uploaded at all
        // where the trainable copies replace them (`Gemma3Gpu::from_weights`): embed_tokens when
        // both roles have a trainable copy.
        let copies = opts
            .lora
            .as_ref()
            .map_or(&[][..], |l| l.modules_to_save.as_slice());
        let has_copy = |m: &str| copies.iter().any(|c| c == m);
        let untied_head = others.iter().any(|e| e.name == LM_HEAD);
        let embed_replaced = has_copy("embed_tokens") && (has_copy("lm_head") || untied_head);
        let head_replaced = has_copy("lm_head");
        let td = opts.frozen_tables;
        let tb = td.size() as u64;
        for e in &others {
            let is_table = e.name == EMBED_TOKENS || e.name == LM_HEAD;
            let replaced =
                (e.name == EMBED_TOKENS && embed_replaced) || (e.name == LM_HEAD && head_replaced);
            if replaced {
                continue;
            }
            let b = if is_table { tb } else { bd };
            buffers.push(Buffer {
                name: e.name.clone(),
                bytes: e.numel() as u64 * b,
                row_bytes: row_of(e) * b,
                chunkable: true,
            });
        }
        let embed = others
            .iter()
            .find(|e| e.name == EMBED_TOKENS)
            .expect("always expected");
        let embed_elems = embed.numel() as u64;
        let replaced_note = " (not on the device: the trainable copies replace it)";
        rows.push(PlanRow {
            part: "weights",
            item: format!(
                "{}{}",
                if config.tie_word_embeddings() {
                    "embed_tokens (tied lm_head shares it)"
                } else {
                    "embed_tokens"
                },
                if embed_replaced { replaced_note } else { "" }
            ),
            dtype: td.name(),
            elements: embed_elems,
            bytes: embed_elems * tb,
            device_bytes: if embed_replaced {
                0
            } else {
                dev(embed_elems * tb, row_of(embed) * tb)
            },
        });
        if let Some(head) = others.iter().find(|e| e.name == LM_HEAD) {
            let n = head.numel() as u64;
            rows.push(PlanRow {
                part: "weights",
                item: format!("lm_head{}", if head_replaced { replaced_note } else { "" }),
                dtype: td.name(),
                elements: n,
                bytes: n * tb,
                device_bytes: if head_replaced {
                    0
                } else {
                    dev(n * tb, row_of(head) * tb)
                },
            });
        }
        let rest: Vec<&&ExpectedTensor> = others
            .iter()
            .filter(|e| e.name != EMBED_TOKENS && e.name != LM_HEAD)
            .collect();
        let rest_elems: u64 = rest.iter().map(|e| e.numel() as u64).sum();
        rows.push(PlanRow {
            part: "weights",
            item: "norms, biases, patch/position embeddings, projector".into(),
            dtype: opts.base_dtype.name(),
            elements: rest_elems,
            bytes: rest_elems * bd,
            device_bytes: rest
                .iter()
                .map(|e| dev(e.numel() as u64 * bd, row_of(e) * bd))
                .sum(),
        });

        // Trainable parameters: LoRA A/B in f32 with f32 grads and AdamW m, v.
        if let Some(lora) = &opts.lora {
            let targets: Vec<&&ExpectedTensor> = lin
                .iter()
                .filter(|e| lora.vision || !is_vision(&e.name))
                .collect();
            let params: u64 = targets
                .iter()
                .map(|e| (lora.r * (e.shape[0] + e.shape[1])) as u64)
                .sum();
            let device: u64 = targets
                .iter()
                .map(|e| {
                    let (out, inp) = (e.shape[0] as u64, e.shape[1] as u64);
                    let r = lora.r as u64;
                    4 * (dev(4 * r * inp, 4 * inp) + dev(4 * out * r, 4 * r))
                })
                .sum();
            rows.push(PlanRow {
                part: "trainable",
                item: format!(
                    "LoRA A+B, r={} on {} modules (params + grads + AdamW m, v)",
                    lora.r,
                    targets.len()
                ),
                dtype: "f32",
                elements: params,
                bytes: params * 4 * 4,
                device_bytes: device,
            });
            // The loop's `[1]` f32 gradient norm (clipping and logging), alive for the run.
            rows.push(PlanRow {
                part: "trainable",
                item: "global gradient norm (clipping)".into(),
                dtype: "f32",
                elements: 1,
                bytes: 4,
                device_bytes: pooled_capacity(4),
            });
            for m in &lora.modules_to_save {
                let n = match m.as_str() {
                    "lm_head" | "embed_tokens" => embed_elems,
                    other => bail!("modules_to_save `{other}` is not known to the memory plan (lm_head, embed_tokens)"),
                };
                // The moments are kept in the parameter's dtype (torch's AdamW state for bf16
                // params is bf16; this engine's copies are f32, and so are their moments).
                let d = lora.modules_to_save_dtype;
                let one = n * d.size() as u64;
                let one_dev = dev(one, config.text().hidden_size as u64 * d.size() as u64);
                if lora.optimizer_offload {
                    rows.push(PlanRow {
                        part: "trainable",
                        item: format!(
                            "modules_to_save copy of {m} (params + grads; AdamW on the host)"
                        ),
                        dtype: d.name(),
                        elements: n,
                        bytes: 2 * one,
                        device_bytes: 2 * one_dev,
                    });
                    rows.push(PlanRow {
                        part: "host",
                        item: format!("AdamW m, v of the {m} copy (adamw_offload, host memory)"),
                        dtype: "f32",
                        elements: 2 * n,
                        bytes: 2 * n * 4,
                        device_bytes: 0,
                    });
                } else {
                    rows.push(PlanRow {
                        part: "trainable",
                        item: format!("modules_to_save copy of {m} (params + grads + AdamW m, v)"),
                        dtype: d.name(),
                        elements: n,
                        bytes: 4 * one,
                        device_bytes: 4 * one_dev,
                    });
                }
                buffers.push(Buffer {
                    name: format!("{m} (modules_to_save copy)"),
                    bytes: n * d.size() as u64,
                    row_bytes: config.text().hidden_size as u64 * d.size() as u64,
                    chunkable: true,
                });
            }
        }

        // Activations of one micro-batch, as `Gemma3Gpu::accumulate` allocates them.
        let mut shape = None;
        if let Some(act) = &opts.activations {
            let (act_rows, act_buffers) = activation_rows(config, act, opts.lora.as_ref())?;
            rows.extend(act_rows);
            buffers.extend(act_buffers);
            shape = Some((act.batch, act.seq_len, act.images_per_sample));
        }
        buffers.sort_by_key(|b| std::cmp::Reverse(b.bytes));
        if let Some(act) = opts.activations.as_ref().filter(|a| a.staged_operands) {
            rows.push(staging_row(&buffers, act.max_binding_bytes));
        }
        Ok(MemoryPlan {
            rows,
            buffers,
            batch_shape: shape,
        })
    }

    /// What to pass to `Gpu::reserve_staging` before the first step (the largest binding).
    pub fn staging_reserve_bytes(&self, max_binding_bytes: u64) -> u64 {
        largest_binding(&self.buffers, max_binding_bytes)
    }

    /// Bytes of the data on the device (host rows excluded).
    pub fn total(&self) -> u64 {
        self.rows
            .iter()
            .filter(|r| r.part != "host")
            .map(|r| r.bytes)
            .sum()
    }

    pub fn part_total(&self, part: &str) -> u64 {
        self.rows
            .iter()
            .filter(|r| r.part == part)
            .map(|r| r.bytes)
            .sum()
    }

    /// What the GPU engine holds at the step's peak (pool size classes included).
    pub fn device_total(&self) -> u64 {
        self.rows.iter().map(|r| r.device_bytes).sum()
    }

    pub fn device_part_total(&self, part: &str) -> u64 {
        self.rows
            .iter()
            .filter(|r| r.part == part)
            .map(|r| r.device_bytes)
            .sum()
    }
}
