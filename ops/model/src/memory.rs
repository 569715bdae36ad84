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
        // The vocabulary tables are stored like the trainable copies (bf16 under lora-train's
        // `bf16`), and the frozen ones are not uploaded at all where the copies replace them
        // (`Gemma3Gpu::from_weights`): embed_tokens when both roles have a trainable copy.
        let copies = opts
            .lora
            .as_ref()
            .map_or(&[][..], |l| l.modules_to_save.as_slice());
        let has_copy = |m: &str| copies.iter().any(|c| c == m);
        let untied_head = others.iter().any(|e| e.name == LM_HEAD);
        let embed_replaced = has_copy("embed_tokens") && (has_copy("lm_head") || untied_head);
        let head_replaced = has_copy("lm_head");
        let td = opts
            .lora
            .as_ref()
            .map_or(opts.base_dtype, |l| l.modules_to_save_dtype);
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

    /// The plan as a plain-text table (data bytes, and what the engine allocates for them).
    pub fn table(&self) -> String {
        let mut s = String::new();
        let line = |s: &mut String,
                    part: &str,
                    item: &str,
                    dtype: &str,
                    elems: &str,
                    bytes: u64,
                    device: u64| {
            let _ = writeln!(
                s,
                "{part:<12} {item:<92} {dtype:>7} {elems:>15} {bytes:>16} {:>11} {:>11}",
                human(bytes),
                human(device)
            );
        };
        let _ = writeln!(
            s,
            "{:<12} {:<92} {:>7} {:>15} {:>16} {:>11} {:>11}",
            "part", "item", "dtype", "elements", "bytes", "", "on device"
        );
        for r in &self.rows {
            let elems = if r.elements == 0 {
                "-".to_string()
            } else {
                r.elements.to_string()
            };
            line(
                &mut s,
                r.part,
                &r.item,
                r.dtype,
                &elems,
                r.bytes,
                r.device_bytes,
            );
        }
        for part in ["weights", "trainable", "activations", "staging", "host"] {
            let t = self.part_total(part);
            if t > 0 {
                line(
                    &mut s,
                    part,
                    "subtotal",
                    "",
                    "",
                    t,
                    self.device_part_total(part),
                );
            }
        }
        line(
            &mut s,
            "total",
            "on the device",
            "",
            "",
            self.total(),
            self.device_total(),
        );
        if let Some(b) = self.buffers.first() {
            let _ = writeln!(s, "largest buffer: {} ({})", b.name, human(b.bytes));
        }
        if let Some(b) = self.buffers.iter().find(|b| !b.chunkable) {
            let _ = writeln!(
                s,
                "largest activation (must fit one storage binding): {} ({})",
                b.name,
                human(b.bytes)
            );
        }
        s
    }

    /// Refuses a plan the adapter cannot hold: over the memory budget, an activation larger
    /// than one storage binding (their kernels bind them whole), or a weight whose single row
    /// exceeds the binding (weights are split between rows into chunks). Returns the weights
    /// that will be chunked, with their chunk counts. Call before anything is uploaded.
    pub fn check(&self, limits: &DeviceLimits) -> Result<Vec<(String, u64)>> {
        if let Some(budget) = limits.memory_budget {
            let need = self.device_total();
            if need > budget {
                bail!(
                    "the model needs {} ({need} bytes) on the device but the memory budget is {} ({budget} bytes):\n{}\
                     reduce the batch or sequence length, enable gradient checkpointing, use NF4, or raise the budget",
                    human(need),
                    human(budget),
                    self.table()
                );
            }
        }
        let limit = limits
            .max_buffer_size
            .min(limits.max_storage_buffer_binding_size);
        let too_big: Vec<&Buffer> = self
            .buffers
            .iter()
            .filter(|b| !b.chunkable && b.bytes > limit)
            .collect();
        if let Some(b) = too_big.first() {
            let shape = match self.batch_shape {
                Some((batch, seq, images)) => format!(
                    " (this plan: per-device batch size {batch}, sequence length {seq}, {images} image(s) per example)"
                ),
                None => String::new(),
            };
            let others = if too_big.len() > 1 {
                format!(
                    "; {} more activation buffer(s) are too large as well: {}",
                    too_big.len() - 1,
                    too_big[1..]
                        .iter()
                        .map(|b| format!("`{}` {}", b.name, human(b.bytes)))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            } else {
                String::new()
            };
            bail!(
                "activation buffer `{}` needs {} ({} bytes) but one storage binding on this adapter holds at \
                 most {} ({limit} bytes: max_buffer_size {}, max_storage_buffer_binding_size {}), and \
                 activations are not split into chunks (only weights are){others}. Lower max_length, the \
                 per-device batch size or the images per example{shape}, or use a GPU whose \
                 max_storage_buffer_binding_size is larger",
                b.name,
                human(b.bytes),
                b.bytes,
                human(limit),
                limits.max_buffer_size,
                limits.max_storage_buffer_binding_size
            );
        }
        let mut chunked = Vec::new();
        for b in self.buffers.iter().filter(|b| b.chunkable) {
            if b.bytes > limit {
                if b.row_bytes > limit {
                    bail!(
                        "buffer `{}` has rows of {} bytes, more than the adapter allows in one binding ({} bytes: \
                         max_buffer_size {}, max_storage_buffer_binding_size {})",
                        b.name,
                        b.row_bytes,
                        limit,
                        limits.max_buffer_size,
                        limits.max_storage_buffer_binding_size
                    );
                }
                chunked.push((
                    b.name.clone(),
                    b.bytes.div_ceil(limit / b.row_bytes * b.row_bytes),
                ));
            }
        }
        Ok(chunked)
    }
}

/// One device buffer a training step allocates: 4-byte elements (f32 or u32), `rows` × `cols`.
/// Activations are never split into chunks: their kernels bind them whole.
#[derive(Debug, Clone)]
struct Alloc {
    name: String,
    rows: u64,
    cols: u64,
}

impl Alloc {
    fn bytes(&self) -> u64 {
        (self.rows * self.cols * 4).max(4)
    }
    /// What the engine's pool really allocates for it.
    fn device(&self) -> u64 {
        pooled_capacity(self.bytes())
    }
}

/// A bf16 `[rows, cols]` buffer: the bytes of `ceil(rows·cols / 2)` f32 words.
fn alloc_bf16(list: &mut Vec<Alloc>, name: &str, rows: u64, cols: u64) {
    alloc(
        list,
        &format!("{name} (bf16)"),
        1,
        (rows * cols).div_ceil(2),
    );
}

fn alloc(list: &mut Vec<Alloc>, name: &str, rows: u64, cols: u64) {
    list.push(Alloc {
        name: name.to_string(),
        rows,
        cols,
    });
}

fn device_sum(list: &[Alloc]) -> u64 {
    list.iter().map(Alloc::device).sum()
}

fn byte_sum(list: &[Alloc]) -> u64 {
    list.iter().map(Alloc::bytes).sum()
}

/// The largest binding of the planned buffers: a whole chunk of a chunked one. Every range a
/// kernel stages is one binding of a planned buffer.
fn largest_binding(buffers: &[Buffer], max_binding_bytes: u64) -> u64 {
    buffers
        .iter()
        .map(|b| b.bytes.min(max_binding_bytes))
        .max()
        .unwrap_or(0)
}

/// The textures a CPU adapter stages kernel operands in (ops/engine/src/gpu/staging.rs): lora-train
/// reserves its [`STAGING_TEXTURES`] slots at the largest binding before the first step.
fn staging_row(buffers: &[Buffer], max_binding_bytes: u64) -> PlanRow {
    let texture = texture_bytes(texture_rows(largest_binding(buffers, max_binding_bytes)));
    PlanRow {
        part: "staging",
        item: format!(
            "operand staging textures (CPU adapters): {STAGING_TEXTURES} x the largest binding"
        ),
        dtype: "f32",
        elements: STAGING_TEXTURES * texture / 4,
        bytes: STAGING_TEXTURES * texture,
        device_bytes: STAGING_TEXTURES * texture,
    }
}

/// The 16-byte buffer (a 256-byte pool class) each matmul dispatch without a bias binds in
/// its place (`Gpu::dummy_buffer`); the recorder holds it like any other.
fn matmul_placeholders(list: &mut Vec<Alloc>, matmuls: u64) {
    for _ in 0..matmuls {
        alloc(list, "matmul bias placeholder", 1, 4);
    }
}

/// The forward allocations of a `GpuLinear` with a LoRA pair of rank `r` (none when 0): the
/// output, `x·Aᵀ` (kept), with dropout the dropped-out input (a temporary), and the bias
/// placeholders of its matmuls (the base one when it has no bias, two for the pair).
#[allow(clippy::too_many_arguments)]
fn linear_forward(
    kept: &mut Vec<Alloc>,
    temps: &mut Vec<Alloc>,
    name: &str,
    rows: u64,
    (d_in, d_out): (u64, u64),
    r: u64,
    dropout: bool,
    bias: bool,
) {
    alloc(kept, name, rows, d_out);
    matmul_placeholders(temps, u64::from(!bias) + if r > 0 { 2 } else { 0 });
    if r > 0 {
        alloc(kept, &format!("{name} LoRA x·Aᵀ"), rows, r);
        if dropout {
            alloc(temps, &format!("{name} LoRA dropout(x)"), rows, d_in);
        }
    }
}

/// The backward allocations of a `GpuLinear`: `dx` when asked, and for the LoRA pair `dh`
/// and with dropout the re-drawn dropout(x) and the dropped-out `dx` part.
fn linear_backward(
    list: &mut Vec<Alloc>,
    name: &str,
    rows: u64,
    d_in: u64,
    r: u64,
    dropout: bool,
    need_dx: bool,
) {
    if need_dx {
        alloc(list, &format!("d {name} input"), rows, d_in);
    }
    // dx through the base weight; dB, dh, dA and (when asked) dx for the pair.
    matmul_placeholders(
        list,
        u64::from(need_dx) + if r > 0 { 3 + u64::from(need_dx) } else { 0 },
    );
    if r > 0 {
        alloc(list, &format!("{name} LoRA dh"), rows, r);
        if dropout {
            alloc(list, &format!("{name} LoRA dropout(x)"), rows, d_in);
            if need_dx {
                alloc(list, &format!("{name} LoRA dropout(dx)"), rows, d_in);
            }
        }
    }
}

/// What `GpuDecoderLayer::forward` allocates: `(kept for the backward, temporaries)`.
fn text_layer_forward(t: &TextShape) -> (Vec<Alloc>, Vec<Alloc>) {
    let (mut kept, mut temps) = (Vec::new(), Vec::new());
    let (n, h, q, kv, i, r, p) = (t.tokens, t.hidden, t.q, t.kv, t.inter, t.r, t.dropout);
    alloc(&mut kept, "text input_layernorm out", n, h);
    alloc(&mut kept, "text rstd", n, 1);
    linear_forward(&mut kept, &mut temps, "text q_proj", n, (h, q), r, p, false);
    linear_forward(
        &mut kept,
        &mut temps,
        "text k_proj",
        n,
        (h, kv),
        r,
        p,
        false,
    );
    linear_forward(
        &mut kept,
        &mut temps,
        "text v_proj",
        n,
        (h, kv),
        r,
        p,
        false,
    );
    alloc(&mut kept, "text q after q_norm + RoPE", n, q);
    alloc(&mut kept, "text q_norm rstd", n * t.heads, 1);
    alloc(&mut kept, "text k after k_norm + RoPE", n, kv);
    alloc(&mut kept, "text k_norm rstd", n * t.kv_heads, 1);
    alloc(&mut kept, "text attention output", n, q);
    alloc(&mut kept, "text attention log-sum-exp", n * t.heads, 1);
    linear_forward(&mut kept, &mut temps, "text o_proj", n, (q, h), r, p, false);
    alloc(&mut kept, "text attention residual h", n, h);
    alloc(&mut kept, "text rstd", n, 1);
    alloc(&mut kept, "text pre_feedforward_layernorm out", n, h);
    alloc(&mut kept, "text rstd", n, 1);
    linear_forward(
        &mut kept,
        &mut temps,
        "text MLP gate_proj",
        n,
        (h, i),
        r,
        p,
        false,
    );
    linear_forward(
        &mut kept,
        &mut temps,
        "text MLP up_proj",
        n,
        (h, i),
        r,
        p,
        false,
    );
    alloc(&mut kept, "text MLP gelu(gate)·up", n, i);
    linear_forward(
        &mut kept,
        &mut temps,
        "text MLP down_proj",
        n,
        (i, h),
        r,
        p,
        false,
    );
    alloc(&mut kept, "text rstd", n, 1);
    // The layer output is the next layer's input (kept by that layer, or the final norm's).
    alloc(&mut temps, "text layer output", n, h);
    (kept, temps)
}

/// What `GpuDecoderLayer::backward` allocates.
fn text_layer_backward(t: &TextShape) -> Vec<Alloc> {
    let mut l = Vec::new();
    let (n, h, q, kv, i, r, p) = (t.tokens, t.hidden, t.q, t.kv, t.inter, t.r, t.dropout);
    alloc(&mut l, "text d down_proj out", n, h);
    linear_backward(&mut l, "text MLP down_proj", n, i, r, p, true);
    alloc(&mut l, "text MLP d gate", n, i);
    alloc(&mut l, "text MLP d up", n, i);
    linear_backward(&mut l, "text MLP gate_proj", n, h, r, p, true);
    linear_backward(&mut l, "text MLP up_proj", n, h, r, p, true);
    alloc(&mut l, "text d h", n, h);
    alloc(&mut l, "text d o_proj out", n, h);
    linear_backward(&mut l, "text o_proj", n, q, r, p, true);
    alloc(&mut l, "text d q (attention)", n, q);
    alloc(&mut l, "text d k (attention)", n, kv);
    alloc(&mut l, "text d v (attention)", n, kv);
    alloc(&mut l, "text attention backward row stats", n * t.heads, 2);
    alloc(&mut l, "text d q before q_norm", n, q);
    alloc(&mut l, "text d k before k_norm", n, kv);
    for name in ["text q_proj", "text k_proj", "text v_proj"] {
        linear_backward(&mut l, name, n, h, r, p, true);
    }
    alloc(&mut l, "text d layer input", n, h);
    l
}

/// Shapes of one text layer's work.
struct TextShape {
    tokens: u64,
    hidden: u64,
    /// heads · head_dim, kv_heads · head_dim.
    q: u64,
    kv: u64,
    inter: u64,
    heads: u64,
    kv_heads: u64,
    r: u64,
    dropout: bool,
}

/// Shapes of the SigLIP tower's work. The tower runs one image at a time
/// (`GpuVisionTower`): its layers' buffers are one image's, `[patches, ..]`.
struct VisionShape {
    /// Images of the micro-batch.
    images: u64,
    patches: u64,
    patch_dim: u64,
    hidden: u64,
    inter: u64,
    heads: u64,
    layers: u64,
    /// The projector's output rows per image and the text hidden size.
    tokens_per_image: u64,
    text_hidden: u64,
    r: u64,
    dropout: bool,
    /// lora-train's `bf16`: layer inputs rounded through a bf16 copy, kept when checkpointed.
    bf16: bool,
}

/// What one SigLIP encoder layer's forward allocates for one image
/// (`GpuVisionTower::layer_forward`): `(kept for its backward, temporaries, its output)`. Its
/// input is the previous layer's output.
fn vision_layer_forward(v: &VisionShape) -> (Vec<Alloc>, Vec<Alloc>, Alloc) {
    let (mut kept, mut temps) = (Vec::new(), Vec::new());
    let (n, h, i, r, p) = (v.patches, v.hidden, v.inter, v.r, v.dropout);
    alloc(&mut kept, "vision layer_norm1 out", n, h);
    alloc(&mut kept, "vision layer_norm1 stats", n, 2);
    for name in ["vision q_proj", "vision k_proj", "vision v_proj"] {
        linear_forward(&mut kept, &mut temps, name, n, (h, h), r, p, true);
    }
    alloc(&mut kept, "vision attention output", n, h);
    alloc(&mut kept, "vision attention log-sum-exp", n * v.heads, 1);
    linear_forward(
        &mut kept,
        &mut temps,
        "vision out_proj",
        n,
        (h, h),
        r,
        p,
        true,
    );
    alloc(&mut kept, "vision layer_norm2 out", n, h);
    alloc(&mut kept, "vision layer_norm2 stats", n, 2);
    linear_forward(
        &mut kept,
        &mut temps,
        "vision MLP fc1",
        n,
        (h, i),
        r,
        p,
        true,
    );
    alloc(&mut kept, "vision MLP gelu", n, i);
    let mut fc2 = Vec::new();
    linear_forward(
        &mut fc2,
        &mut temps,
        "vision MLP fc2",
        n,
        (i, h),
        r,
        p,
        true,
    );
    let out = fc2.remove(0);
    kept.extend(fc2);
    (kept, temps, out)
}

/// What one SigLIP encoder layer's backward allocates for one image
/// (`GpuVisionTower::layer_backward`); the last entry is the gradient of its input when `need_dx`.
fn vision_layer_backward(v: &VisionShape, need_dx: bool) -> Vec<Alloc> {
    let mut l = Vec::new();
    let (n, h, i, r, p) = (v.patches, v.hidden, v.inter, v.r, v.dropout);
    linear_backward(&mut l, "vision MLP fc2", n, i, r, p, true);
    alloc(&mut l, "vision MLP d fc1 out", n, i);
    linear_backward(&mut l, "vision MLP fc1", n, h, r, p, true);
    alloc(&mut l, "vision d h", n, h);
    linear_backward(&mut l, "vision out_proj", n, h, r, p, true);
    for name in ["vision d q", "vision d k", "vision d v"] {
        alloc(&mut l, name, n, h);
    }
    alloc(
        &mut l,
        "vision attention backward row stats",
        n * v.heads,
        2,
    );
    for name in ["vision q_proj", "vision k_proj", "vision v_proj"] {
        linear_backward(&mut l, name, n, h, r, p, need_dx);
    }
    if need_dx {
        alloc(&mut l, "vision d layer input", n, h);
    }
    l
}

/// The step as the engine sees it: buffers come alive in program order, a `Recorder` holds
/// every buffer it bound until its flush, so a buffer its owner drops returns to the pool at
/// the next flush. Live bytes grow within a phase and fall at each flush; the peak is sampled
/// at every flush (and before a buffer is freed at once), with what was live then, by group.
#[derive(Default)]
struct Timeline {
    live: Vec<Live>,
    next: usize,
    peak: u64,
    /// `(group, buffers)` at the peak, and the phase it happened in.
    at_peak: Vec<(String, Vec<Alloc>)>,
    peak_phase: String,
    /// Every buffer ever allocated (for the binding checks).
    seen: Vec<Alloc>,
}

struct Live {
    id: usize,
    group: String,
    alloc: Alloc,
    released: bool,
}

/// The group name of a phase's temporaries (named after the phase at the peak).
const WORKING_SET: &str = "";

impl Timeline {
    fn add(&mut self, group: &str, list: &[Alloc]) -> Vec<usize> {
        list.iter()
            .map(|a| {
                self.next += 1;
                self.seen.push(a.clone());
                self.live.push(Live {
                    id: self.next,
                    group: group.to_string(),
                    alloc: a.clone(),
                    released: false,
                });
                self.next
            })
            .collect()
    }

    /// The temporaries of the current phase: released at its flush.
    fn temps(&mut self, list: &[Alloc]) {
        let ids = self.add(WORKING_SET, list);
        self.release(&ids);
    }

    /// The owner dropped these; they are freed at the next flush.
    fn release(&mut self, ids: &[usize]) {
        for l in self.live.iter_mut().filter(|l| ids.contains(&l.id)) {
            l.released = true;
        }
    }

    fn sample(&mut self, phase: &str) {
        let bytes: u64 = self.live.iter().map(|l| l.alloc.device()).sum();
        if bytes > self.peak {
            self.peak = bytes;
            self.peak_phase = phase.to_string();
            let mut groups: Vec<(String, Vec<Alloc>)> = Vec::new();
            for l in &self.live {
                let group = if l.group == WORKING_SET {
                    format!("working set of {phase}")
                } else {
                    l.group.clone()
                };
                match groups.iter_mut().find(|(g, _)| *g == group) {
                    Some((_, list)) => list.push(l.alloc.clone()),
                    None => groups.push((group, vec![l.alloc.clone()])),
                }
            }
            self.at_peak = groups;
        }
    }

    /// Freed at once: the owner dropped them outside any recorder that bound them.
    fn free_now(&mut self, ids: &[usize], phase: &str) {
        self.sample(phase);
        self.live.retain(|l| !ids.contains(&l.id));
    }

    /// `Recorder::flush`: the released buffers return to the pool.
    fn flush(&mut self, phase: &str) {
        self.sample(phase);
        self.live.retain(|l| !l.released);
    }
}

/// u32 words of one uploaded attention mask, as the kernel sizes it.
fn mask_words(batch: u64, seq: u64) -> u64 {
    mask_word_count(batch as usize, seq as usize) as u64
}

/// The fused lm_head + cross-entropy's own scratch (`gpu::kernels::cross_entropy`): a
/// `[tokens, block]` logits block over one vocabulary chunk at a time and `[tokens, 8]` row
/// state. The block is as wide as the binding and `LOGITS_SCRATCH_BYTES` allow, at most `MAX_VOCAB_BLOCK`; the kernel
/// refuses a token count for which not even 8 columns fit. The widths come from the kernel's
/// own sizing functions (`logits_block`, `bf16_dw_rows`).
/// `bf16_dw`: the trained lm_head copy is bf16, so each block's dW goes through an f32 scratch
/// of `sub` rows of `hidden` (one matmul per sub-block).
fn cross_entropy_scratch(
    tokens: u64,
    vocab: u64,
    hidden: u64,
    max_binding: u64,
    d_weight: bool,
    bf16_dw: bool,
) -> Result<Vec<Alloc>> {
    // The kernel's own block width (gpu::kernels::cross_entropy).
    let Some(block) = logits_block(tokens as usize, vocab as usize, max_binding) else {
        bail!(
            "the fused cross-entropy needs at least 8 logits per token in one storage binding: \
             {tokens} tokens per micro-batch need {} bytes, the scratch holds {}; lower \
             max_length or the per-device batch size",
            tokens * 32,
            max_binding.min(LOGITS_SCRATCH_BYTES as u64)
        );
    };
    let block = block as u64;
    let mut l = Vec::new();
    alloc(&mut l, "cross-entropy logits block", tokens, block);
    alloc(&mut l, "cross-entropy row state", tokens, 8);
    // Its products run as matmuls: the logits of every block, recomputed in backward for all
    // but the last, dH per block and (a trained lm_head) dW per block.
    let blocks = vocab.div_ceil(block);
    let mut dw_matmuls = if d_weight { blocks } else { 0 };
    if d_weight && bf16_dw {
        let sub = bf16_dw_rows(hidden as usize, block as usize, max_binding)
            .context("the bf16 lm_head gradient scratch holds no 8 rows")? as u64;
        alloc(&mut l, "cross-entropy bf16 gradient scratch", sub, hidden);
        // every block but the last is `block` wide
        let last = vocab - (blocks - 1) * block;
        dw_matmuls = (blocks - 1) * block.div_ceil(sub) + last.div_ceil(sub);
    }
    matmul_placeholders(&mut l, blocks + (blocks - 1) + blocks + dw_matmuls);
    Ok(l)
}

fn is_vision(name: &str) -> bool {
    name.starts_with(VISION)
}

fn activation_row(item: String, list: &[Alloc]) -> PlanRow {
    PlanRow {
        part: "activations",
        item,
        dtype: "f32",
        elements: byte_sum(list) / 4,
        bytes: byte_sum(list),
        device_bytes: device_sum(list),
    }
}

/// The tower's shapes for `act`'s micro-batch; none without images or a vision tower.
fn vision_shape(
    config: &ModelConfig,
    act: &ActivationPlan,
    lora: Option<&LoraPlan>,
) -> Option<VisionShape> {
    match (config, config.vision()) {
        (ModelConfig::ConditionalGeneration(g), Some(v)) if act.images_per_sample > 0 => {
            Some(VisionShape {
                images: (act.batch * act.images_per_sample) as u64,
                patches: v.num_patches() as u64,
                patch_dim: v.patch_dim() as u64,
                hidden: v.hidden_size as u64,
                inter: v.intermediate_size as u64,
                heads: v.num_attention_heads as u64,
                layers: v.num_hidden_layers as u64,
                tokens_per_image: g.mm_tokens_per_image as u64,
                text_hidden: config.text().hidden_size as u64,
                r: lora.filter(|l| l.vision).map_or(0, |l| l.r as u64),
                dropout: lora.is_some_and(|l| l.dropout),
                bf16: lora.is_some_and(|l| l.modules_to_save_dtype == FloatDtype::BF16),
            })
        }
        _ => None,
    }
}

/// What the tower's forward keeps for its backward (`GpuVisionCache`).
struct TowerKept {
    /// Per image: each layer's kept buffers, and its post_layernorm input and stats.
    images: Vec<(Vec<Vec<usize>>, Vec<usize>)>,
    mask: Vec<usize>,
}

/// `GpuVisionTower::forward` on the timeline, one image at a time: returns its output
/// `[images · patches, hidden]` and, when the tower trains, what it keeps (in group `kept`).
fn tower_forward(
    tl: &mut Timeline,
    v: &VisionShape,
    ckpt: bool,
    kept: &str,
) -> (Vec<usize>, Option<TowerKept>) {
    let train = v.r > 0;
    let (p, hv) = (v.patches, v.hidden);
    let one = |name: &str, rows: u64, cols: u64| -> Vec<Alloc> {
        let mut l = Vec::new();
        alloc(&mut l, name, rows, cols);
        l
    };
    let mask = tl.add(kept, &one("vision attention mask", mask_words(1, p), 1));
    let output = tl.add(
        "vision output (every image's rows, the projector's input)",
        &one("vision output", v.images * p, hv),
    );
    let mut per_image = Vec::new();
    for img in 0..v.images {
        let of = format!("image {} of {}", img + 1, v.images);
        tl.temps(&one("vision pixels of one image", 1, p * v.patch_dim));
        tl.temps(&one("vision unfolded patches", p, v.patch_dim));
        let mut vx = tl.add(kept, &one("vision embeddings", p, hv));
        tl.flush(&format!("the patch embedding of {of}"));
        let mut layer_ids = Vec::new();
        let mut bf16_input = Vec::new();
        alloc_bf16(&mut bf16_input, "vision layer input", p, hv);
        for l in 0..v.layers {
            let rounded = v.bf16.then(|| tl.add(kept, &bf16_input));
            let (cache, temps, out) = vision_layer_forward(v);
            let k = tl.add(kept, &cache);
            tl.temps(&temps);
            let o = tl.add(kept, &[out]);
            if let Some(r) = &rounded {
                // kept instead of the f32 input when checkpointed; else dropped with the layer
                if train && ckpt {
                    tl.release(&vx);
                } else {
                    tl.release(r);
                }
            }
            if !train {
                tl.release(&vx);
                tl.release(&k);
            } else if ckpt {
                tl.release(&k);
                layer_ids.push(rounded.unwrap_or_else(|| vx.clone()));
            } else {
                layer_ids.push([vx.clone(), k].concat());
            }
            tl.flush(&format!("SigLIP layer {l}'s forward, {of}"));
            vx = o;
        }
        tl.temps(&one("vision post_layernorm out", p, hv));
        let stats = tl.add(kept, &one("vision post_layernorm stats", p, 2));
        if train {
            per_image.push((layer_ids, [vx, stats].concat()));
        } else {
            tl.release(&vx);
            tl.release(&stats);
        }
        tl.flush(&format!("the post_layernorm of {of}"));
    }
    if !train {
        // The tower keeps nothing: its mask goes when its forward returns.
        tl.free_now(&mask, "the image path's post_layernorm");
        return (output, None);
    }
    (
        output,
        Some(TowerKept {
            images: per_image,
            mask,
        }),
    )
}

/// `GpuVisionTower::backward` on the timeline, image by image and layer by layer (its output
/// gradient already on the device); `at_return` (the caller's buffers that go when it returns)
/// is released with its last flush, as its mask is.
fn tower_backward(
    tl: &mut Timeline,
    v: &VisionShape,
    ckpt: bool,
    kept: TowerKept,
    at_return: &[usize],
) {
    let (p, hv) = (v.patches, v.hidden);
    let image_grad = "image path gradient";
    let one = |name: &str| -> Vec<Alloc> {
        let mut l = Vec::new();
        alloc(&mut l, name, p, hv);
        l
    };
    let count = kept.images.len();
    for (n, (mut layers, last)) in kept.images.into_iter().enumerate() {
        let of = format!("image {} of {}", n + 1, v.images);
        tl.temps(&one("vision d output of one image"));
        let mut grad = tl.add(image_grad, &one("vision d post_layernorm input"));
        tl.release(&last);
        tl.flush(&format!("the post_layernorm's backward of {of}"));
        for l in (0..v.layers).rev() {
            let ids = layers.pop().expect("one entry per layer");
            if ckpt {
                if v.bf16 {
                    tl.temps(&one("vision layer input widened from bf16"));
                }
                let (cache, temps, out) = vision_layer_forward(v);
                tl.temps(&cache);
                tl.temps(&temps);
                tl.temps(&[out]);
            }
            let mut back = vision_layer_backward(v, l > 0);
            let dx = (l > 0).then(|| back.pop().expect("the input gradient"));
            tl.temps(&back);
            tl.release(&ids);
            if let Some(dx) = dx {
                let next = tl.add(image_grad, &[dx]);
                tl.release(&grad);
                grad = next;
            } else {
                // The image's backward is done: its gradient goes; after the last image the
                // tower's backward returns, and its mask and the caller's buffers go.
                tl.release(&grad);
                if n + 1 == count {
                    tl.release(&kept.mask);
                    tl.release(at_return);
                }
            }
            tl.flush(&format!(
                "SigLIP layer {l}'s backward{}, {of}",
                if ckpt { " (forward recomputed)" } else { "" }
            ));
        }
    }
}

/// Device bytes the SigLIP tower alone takes at its peak beyond its inputs (pixels and output
/// gradient already on the device): `GpuVisionTower::forward` then `backward` on `act`'s images,
/// the output kept throughout, as the tower allocates them one image at a time. In a whole
/// step the text stack's peak can hide the tower's (it does on the tiny test model), so the
/// tower's own plan is checked against the engine on its own too.
pub fn vision_tower_peak(
    config: &ModelConfig,
    act: &ActivationPlan,
    lora: Option<&LoraPlan>,
) -> Result<u64> {
    let Some(v) = vision_shape(config, act, lora) else {
        bail!("the plan has no images, or the model no vision tower");
    };
    let mut tl = Timeline::default();
    let (_output, kept) = tower_forward(&mut tl, &v, act.gradient_checkpointing, "tower kept");
    if let Some(kept) = kept {
        tower_backward(&mut tl, &v, act.gradient_checkpointing, kept, &[]);
    }
    tl.flush("the tower's return");
    Ok(tl.peak)
}

/// The activation rows and buffers of one micro-batch on `Gemma3Gpu`.
///
/// The engine returns a buffer to its pool only when nothing references it, and a `Recorder`
/// references every buffer it bound until it is flushed. `Gemma3Gpu::accumulate` flushes after
/// each image's patch embedding, SigLIP layers and post_layernorm (the tower runs one image at
/// a time), after each text layer's forward and backward, after the projector and after the
/// loss, so the peak is what is kept (layer caches, or with gradient checkpointing only layer
/// inputs) plus the largest single phase's working set: one image's in the tower. The rows are
/// the buffers live at that peak, by what holds them ([`Timeline`]).
fn activation_rows(
    config: &ModelConfig,
    act: &ActivationPlan,
    lora: Option<&LoraPlan>,
) -> Result<(Vec<PlanRow>, Vec<Buffer>)> {
    let t = config.text();
    let (b, s) = (act.batch as u64, act.seq_len as u64);
    let tokens = b * s;
    let hd = t.head_dim() as u64;
    let r = lora.map_or(0, |l| l.r as u64);
    let dropout = lora.is_some_and(|l| l.dropout);
    let text = TextShape {
        tokens,
        hidden: t.hidden_size as u64,
        q: t.num_attention_heads as u64 * hd,
        kv: t.num_key_value_heads as u64 * hd,
        inter: t.intermediate_size as u64,
        heads: t.num_attention_heads as u64,
        kv_heads: t.num_key_value_heads as u64,
        r,
        dropout,
    };
    let layers = t.num_hidden_layers as u64;
    let h = text.hidden;
    let embed_copy = lora.is_some_and(|l| l.modules_to_save.iter().any(|m| m == "embed_tokens"));

    // Per-batch inputs: ids, positions, one mask per kind of attention window, RoPE tables per
    // (base, scaling), pixels (the labels, the loss totals and the embedding-gradient ids come
    // later, in their phases).
    let mut inputs = Vec::new();
    alloc(&mut inputs, "input ids", tokens, 1);
    alloc(&mut inputs, "positions", tokens, 1);
    let mut windows = Vec::new();
    let mut ropes = Vec::new();
    for l in 0..t.num_hidden_layers {
        let w = t.is_sliding(l);
        if !windows.contains(&w) {
            windows.push(w);
            alloc(&mut inputs, "text attention mask", mask_words(b, s), 1);
        }
        let rope = t.rope(l);
        let key = (rope.theta.to_bits(), rope.linear_factor.to_bits());
        if !ropes.contains(&key) {
            ropes.push(key);
            alloc(&mut inputs, "RoPE cos table", s, hd / 2);
            alloc(&mut inputs, "RoPE sin table", s, hd / 2);
        }
    }
    let vision = vision_shape(config, act, lora);
    if let Some(v) = &vision {
        // One image's pixels: channels · size² = patches · patch_dim values.
        alloc(
            &mut inputs,
            "pixel values",
            v.images,
            v.patches * v.patch_dim,
        );
    }
    let head_trained = lora.is_some_and(|l| l.modules_to_save.iter().any(|m| m == "lm_head"));
    let bf16_tables = lora.is_some_and(|l| l.modules_to_save_dtype == FloatDtype::BF16);
    let ce = cross_entropy_scratch(
        tokens,
        t.vocab_size as u64,
        h,
        act.max_binding_bytes,
        head_trained,
        bf16_tables,
    )?;
    let ckpt = act.gradient_checkpointing;
    let one = |name: &str, rows: u64, cols: u64| -> Vec<Alloc> {
        let mut l = Vec::new();
        alloc(&mut l, name, rows, cols);
        l
    };
    let placeholders = |n: u64| -> Vec<Alloc> {
        let mut l = Vec::new();
        matmul_placeholders(&mut l, n);
        l
    };

    // `Gemma3Gpu::accumulate`, phase by phase (each ends with a `Recorder::flush`).
    let mut tl = Timeline::default();
    tl.add(
        "inputs: token ids, positions, attention masks, RoPE tables, pixels",
        &inputs,
    );
    let text_inputs = if ckpt {
        "checkpointed text layer inputs (embeddings, layer outputs)"
    } else {
        "text layer inputs (embeddings, layer outputs)"
    };
    let mut x = tl.add(text_inputs, &one("text embeddings", tokens, h));

    // The image path (`Gemma3Gpu::embed`): SigLIP one image at a time, flushed after each
    // image's patch embedding, layer and post_layernorm, then the projector over every image.
    struct ImageKept {
        tower: TowerKept,
        projector: Vec<usize>,
    }
    let mut image = None;
    if let Some(v) = &vision {
        let kept = if ckpt {
            "image path kept for the backward (checkpointed SigLIP layer inputs, projector)"
        } else {
            "image path kept for the backward (SigLIP layer activations, projector)"
        };
        let (output, tower) = tower_forward(&mut tl, v, ckpt, kept);
        let rows = v.images * v.tokens_per_image;
        let hv = v.hidden;
        let mut projector = tl.add(kept, &one("projector pooled", rows, hv));
        tl.temps(&one("projector normed", rows, hv));
        projector.extend(tl.add(kept, &one("projector rstd", rows, 1)));
        tl.temps(&one("projector features", rows, v.text_hidden));
        tl.temps(&placeholders(1));
        if tower.is_none() {
            tl.release(&projector);
        }
        // `Gemma3Gpu::embed` drops the tower's output once the features are merged.
        tl.release(&output);
        tl.flush("the projector");
        image = tower.map(|tower| ImageKept { tower, projector });
    }

    // Text layers: each keeps its activations (or, checkpointed, only its input).
    let text_kept = "text layer activations kept for the backward";
    let (layer_cache, mut layer_temps) = text_layer_forward(&text);
    let layer_out = layer_temps.pop().expect("a layer has an output");
    // Under `bf16` each layer input is rounded through a bf16 copy, which a checkpointed step
    // keeps instead of the f32 input (dropped once the layer's forward is recorded).
    let mut bf16_input = Vec::new();
    alloc_bf16(&mut bf16_input, "text layer input", tokens, h);
    let mut saved = Vec::new();
    for l in 0..layers {
        let rounded = bf16_tables.then(|| tl.add(text_inputs, &bf16_input));
        let k = tl.add(text_kept, &layer_cache);
        tl.temps(&layer_temps);
        let o = tl.add(text_inputs, std::slice::from_ref(&layer_out));
        if ckpt {
            tl.release(&k);
        }
        tl.flush(&format!("text layer {l}'s forward"));
        match rounded {
            Some(r) if ckpt => {
                tl.release(&x);
                saved.push((r, k));
            }
            Some(r) => {
                tl.release(&r);
                saved.push((x, k));
            }
            None => saved.push((x, k)),
        }
        x = o;
    }

    // The loss: final norm, the fused lm_head + cross-entropy, the norm's backward.
    let mut loss_locals = Vec::new();
    alloc(&mut loss_locals, "final norm out", tokens, h);
    alloc(&mut loss_locals, "final norm rstd", tokens, 1);
    alloc(&mut loss_locals, "labels", tokens, 1);
    alloc(&mut loss_locals, "d final norm out", tokens, h);
    tl.temps(&loss_locals);
    tl.add("loss totals", &one("loss totals", 4, 1));
    let ce_group = format!(
        "fused lm_head + cross-entropy scratch ({} logits per token at a time)",
        ce[0].cols
    );
    let ce_ids = tl.add(&ce_group, &ce);
    tl.release(&ce_ids);
    let d_group = "hidden-state gradient";
    let mut d = tl.add(d_group, &one("d hidden states", tokens, h));
    tl.release(&x);
    tl.flush("the loss (final norm, fused lm_head + cross-entropy)");

    for l in (0..layers).rev() {
        let (input, k) = saved.pop().expect("one entry per layer");
        if ckpt {
            if bf16_tables {
                tl.temps(&one("text layer input widened from bf16", tokens, h));
            }
            tl.temps(&layer_cache);
            tl.temps(&layer_temps);
            tl.temps(std::slice::from_ref(&layer_out));
        }
        let mut back = text_layer_backward(&text);
        let dx = back.pop().expect("the input gradient");
        tl.temps(&back);
        let next = tl.add(d_group, &[dx]);
        tl.release(&d);
        tl.release(&input);
        tl.release(&k);
        tl.flush(&format!(
            "text layer {l}'s backward{}",
            if ckpt { " (forward recomputed)" } else { "" }
        ));
        d = next;
    }

    // The image features' gradient through the projector, then the tower image by image, layer
    // by layer.
    if let (Some(v), Some(img)) = (&vision, image) {
        let hv = v.hidden;
        let rows = v.images * v.tokens_per_image;
        tl.temps(&one("image features gradient", rows, v.text_hidden));
        tl.temps(&one("projector d normed", rows, hv));
        tl.temps(&placeholders(1));
        tl.temps(&one("projector d pooled", rows, hv));
        let d_vision = tl.add(
            "image path gradient",
            &one("projector d vision output", v.images * v.patches, hv),
        );
        tl.release(&img.projector);
        tl.flush("the projector's backward");
        tower_backward(&mut tl, v, ckpt, img.tower, &d_vision);
    }
    if embed_copy && bf16_tables {
        // ids grouped by row on the host (`embedding_scatter_add_bf16`): unique ids, their
        // offsets and the token positions; at most `tokens` each (an upper bound).
        tl.temps(&one("embedding-gradient unique ids", tokens, 1));
        tl.temps(&one("embedding-gradient id offsets", tokens + 1, 1));
        tl.temps(&one("embedding-gradient positions", tokens, 1));
    } else if embed_copy {
        tl.temps(&one("embedding-gradient ids", tokens, 1));
    }
    tl.flush("the embedding gradient");

    let rows = tl
        .at_peak
        .iter()
        .map(|(group, list)| activation_row(format!("{group} ({} buffers)", list.len()), list))
        .collect::<Vec<_>>();
    let mut rows = rows;
    if let Some(first) = rows.first_mut() {
        first.item = format!("[peak in {}] {}", tl.peak_phase, first.item);
    }
    let mut seen = std::collections::HashSet::new();
    let mut buffers: Vec<Buffer> = Vec::new();
    for a in &tl.seen {
        if seen.insert((a.name.clone(), a.rows, a.cols)) {
            buffers.push(Buffer {
                name: format!("{} [{}, {}] f32", a.name, a.rows, a.cols),
                bytes: a.bytes(),
                row_bytes: a.cols * 4,
                chunkable: false,
            });
        }
    }
    Ok((rows, buffers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GEMMA_3_4B_IT_CONFIG_JSON;

    fn guide_options() -> PlanOptions {
        PlanOptions {
            base: BaseFormat::Nf4 { double_quant: true },
            base_dtype: FloatDtype::BF16,
            lora: Some(LoraPlan {
                r: 16,
                modules_to_save: vec!["lm_head".into(), "embed_tokens".into()],
                modules_to_save_dtype: FloatDtype::BF16,
                vision: true,
                dropout: true,
                optimizer_offload: false,
            }),
            activations: Some(ActivationPlan {
                batch: 1,
                seq_len: 2048,
                images_per_sample: 1,
                gradient_checkpointing: true,
                activation_dtype: FloatDtype::F32,
                max_binding_bytes: 128 << 20,
                staged_operands: false,
            }),
        }
    }

    /// Hand-computed figures for gemma-3-4b-it (spec §2 shapes).
    #[test]
    fn gemma_3_4b_weights_by_hand() {
        let c = ModelConfig::from_json(GEMMA_3_4B_IT_CONFIG_JSON).unwrap();
        let plan = MemoryPlan::build(&c, &guide_options()).unwrap();
        println!("{}", plan.table());
        // Linear params: text 34 * (2048*2560 + 2*1024*2560 + 2560*2048 + 3*10240*2560)
        // + vision 27 * (4*1152^2 + 2*4304*1152).
        let text_lin: u64 = 34 * (2048 * 2560 + 2 * 1024 * 2560 + 2560 * 2048 + 3 * 10240 * 2560);
        let vis_lin: u64 = 27 * (4 * 1152 * 1152 + 2 * 4304 * 1152);
        let nf4 = &plan.rows[0];
        assert_eq!(nf4.elements, text_lin + vis_lin);
        assert_eq!(nf4.bytes, (text_lin + vis_lin) / 2);
        // LoRA r=16: 876,544 per text layer, 322,048 per vision layer.
        let lora = plan
            .rows
            .iter()
            .find(|r| r.item.starts_with("LoRA"))
            .unwrap();
        assert_eq!(lora.elements, 34 * 876_544 + 27 * 322_048);
        assert_eq!(lora.bytes, lora.elements * 16);
        // The embedding (262208 x 2560) in bf16, and two bf16 trainable copies x 4 (param, grad, m, v).
        let embed = plan
            .rows
            .iter()
            .find(|r| r.item.starts_with("embed_tokens"))
            .unwrap();
        assert_eq!(embed.bytes, 262_208 * 2560 * 2);
        // ... and the 4-byte gradient norm.
        assert_eq!(
            plan.part_total("trainable"),
            lora.bytes + 2 * 262_208 * 2560 * 2 * 4 + 4
        );
    }

    /// What the README's scaling model uses: the guide's LoRA (r 16, all-linear with the
    /// tower) moves 147 MiB per step; its bf16 lm_head copy 1.25 GiB more; the embed_tokens
    /// copy only the rows the step's tokens touch.
    #[test]
    fn gemma_3_4b_allreduce_payload() {
        let c = ModelConfig::from_json(GEMMA_3_4B_IT_CONFIG_JSON).unwrap();
        let lora = guide_options().lora.unwrap();
        let p = allreduce_payload(&c, &lora, 2048).unwrap();
        assert_eq!(p.lora, 4 * (34 * 876_544 + 27 * 322_048));
        assert_eq!(p.lora, 153_991_168);
        assert_eq!(p.lm_head, 262_208 * 2560 * 2);
        assert_eq!(p.embed_tokens, 2048 * 2560 * 2);
        assert_eq!(
            allreduce_payload(&c, &lora, 1 << 30).unwrap().embed_tokens,
            p.lm_head,
            "never more rows than the vocabulary"
        );
        let only = LoraPlan {
            modules_to_save: vec![],
            ..lora
        };
        assert_eq!(allreduce_payload(&c, &only, 2048).unwrap().total(), p.lora);
    }

    #[test]
    fn checkpointing_saves_memory_and_budget_refuses() {
        let c = ModelConfig::from_json(GEMMA_3_4B_IT_CONFIG_JSON).unwrap();
        let mut opts = guide_options();
        let with = MemoryPlan::build(&c, &opts).unwrap();
        opts.activations.as_mut().unwrap().gradient_checkpointing = false;
        let without = MemoryPlan::build(&c, &opts).unwrap();
        // Checkpointing keeps 34 layer inputs instead of every buffer of 34 layers' forward and
        // backward (the image path is not checkpointed: it dominates both).
        let (w, wo) = (
            with.device_part_total("activations"),
            without.device_part_total("activations"),
        );
        assert!(wo > 2 * w, "{wo} vs {w}");
        let limits = DeviceLimits {
            max_buffer_size: 1 << 30,
            max_storage_buffer_binding_size: 1 << 27,
            memory_budget: Some(8 << 30),
        };
        let e = with.check(&limits).unwrap_err().to_string();
        assert!(e.contains("memory budget is 8.00 GiB"), "{e}");
        let roomy = DeviceLimits {
            memory_budget: Some(200 << 30),
            ..limits
        };
        let chunked = with.check(&roomy).unwrap();
        // The 1.34 GB bf16 embedding does not fit one 128 MiB binding: split between rows.
        assert!(
            chunked
                .iter()
                .any(|(n, k)| n.contains("embed_tokens") && *k == 11),
            "{chunked:?}"
        );
        // Weights alone: rows wider than the binding cannot be chunked.
        let tiny = DeviceLimits {
            max_buffer_size: 1024,
            max_storage_buffer_binding_size: 1024,
            memory_budget: None,
        };
        let weights_only = MemoryPlan::build(
            &c,
            &PlanOptions {
                activations: None,
                ..guide_options()
            },
        )
        .unwrap();
        let e = weights_only.check(&tiny).unwrap_err().to_string();
        assert!(e.contains("rows of"), "{e}");
    }

    /// Activations are bound whole: one larger than the binding is refused upfront, naming
    /// the buffer, its size, the limit and what to lower. By hand: the text MLP's
    /// [tokens, 10240] f32 passes 128 MiB above 3276 tokens (134,217,728 / 40,960).
    #[test]
    fn activation_over_one_binding_is_refused() {
        let c = ModelConfig::from_json(GEMMA_3_4B_IT_CONFIG_JSON).unwrap();
        let lavapipe = DeviceLimits {
            max_buffer_size: 1 << 30,
            max_storage_buffer_binding_size: 128 << 20,
            memory_budget: None,
        };
        let plan_for = |batch: usize, seq_len: usize, images: usize| {
            let mut o = guide_options();
            let a = o.activations.as_mut().unwrap();
            (a.batch, a.seq_len, a.images_per_sample) = (batch, seq_len, images);
            MemoryPlan::build(&c, &o).unwrap()
        };
        // 3264 tokens: the MLP activations are 127.5 MiB; no other activation is larger.
        plan_for(1, 3264, 1).check(&lavapipe).unwrap();
        let e = plan_for(1, 3300, 1)
            .check(&lavapipe)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("text MLP gate_proj [3300, 10240] f32")
                && e.contains("135168000 bytes")
                && e.contains("(134217728 bytes")
                && e.contains("Lower max_length")
                && e.contains("sequence length 3300"),
            "{e}"
        );
        // SigLIP at 896 px runs one image at a time: its largest buffer, fc1's [4096, 4304]
        // f32 (67.2 MiB), is one image's whatever the batch. Only the tower's output (and its
        // gradient), [images·4096, 1152] f32 at 18 MiB per image, spans the batch: 7 images
        // fit, 8 do not.
        let seven = plan_for(1, 2048, 7);
        seven.check(&lavapipe).unwrap();
        assert!(seven
            .buffers
            .iter()
            .any(|b| b.name == "vision MLP fc1 [4096, 4304] f32"));
        let e = plan_for(1, 2048, 8)
            .check(&lavapipe)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("vision output [32768, 1152] f32") && e.contains("150994944 bytes"),
            "{e}"
        );
        // Artificially low limits: everything but the smallest buffers is refused.
        let tiny = DeviceLimits {
            max_buffer_size: 1024,
            max_storage_buffer_binding_size: 1024,
            memory_budget: None,
        };
        let e = plan_for(1, 16, 0).check(&tiny).unwrap_err().to_string();
        assert!(
            e.contains("one storage binding on this adapter holds at most 1.0 KiB (1024 bytes"),
            "{e}"
        );
    }

    /// transformers 5.24 + bitsandbytes 0.50.2 `get_memory_footprint(return_buffers=False)` for
    /// gemma-3-4b-it in NF4 (tools/memory/bnb_footprint.py: the meta-device rule, validated
    /// against a real CPU 4-bit load of a tiny model): 3,170,589,408 bytes.
    #[test]
    fn matches_transformers_get_memory_footprint() {
        let c = ModelConfig::from_json(GEMMA_3_4B_IT_CONFIG_JSON).unwrap();
        assert_eq!(bnb_parameter_footprint(&c, FloatDtype::BF16), 3_170_589_408);
    }

    /// Gemma 3 4B: 34 layers, every 6th full attention (5), the others a 1024-token window;
    /// 4 KV heads of 256, f32 keys and values: 8 KiB per position and layer.
    #[test]
    fn kv_cache_of_gemma_3_4b_by_hand() {
        let c = ModelConfig::from_json(GEMMA_3_4B_IT_CONFIG_JSON).unwrap();
        let row = kv_cache_row(&c, 1, 2176, 128 << 20);
        assert_eq!(row.bytes, (5 * 2176 + 29 * 1024) * 2 * 4 * 256 * 4);
        assert_eq!(row.bytes, 332_398_592);
        // batch 2 doubles it; positions past the window grow only the full layers
        assert_eq!(kv_cache_row(&c, 2, 2176, 128 << 20).bytes, 2 * row.bytes);
        assert_eq!(
            kv_cache_row(&c, 1, 2177, 128 << 20).bytes - row.bytes,
            5 * 2 * 4 * 256 * 4
        );
    }

    #[test]
    fn nf4_state_bytes_by_hand() {
        // 2560 x 2560: 3,276,800 packed bytes; 102,400 blocks -> 102,400 u8 + 400 f32 nested + offset + maps.
        assert_eq!(
            nf4_state_bytes(2560 * 2560, true),
            (3_276_800, 102_400 + 1600 + 4 + 64 + 1024)
        );
        assert_eq!(
            nf4_state_bytes(2560 * 2560, false),
            (3_276_800, 409_600 + 64)
        );
    }
}
