//! The device memory plan: the bytes a model will take on the device before anything is
//! uploaded — frozen weights by dtype (NF4 packed codes and their quantization state, bf16/f32
//! tensors), the trainable LoRA weights with their gradients and AdamW states, the
//! modules_to_save copies, and the activations of one micro-batch (with or without gradient
//! checkpointing) — printed as a table and refused with a clear error when it exceeds the
//! adapter's limits.
//!
//! Activation figures model this runner's engine (explicit per-layer forward/backward, eager
//! attention keeping the f32 probabilities, a chunked lm_head + loss so full logits never
//! exist); they are an estimate of the buffers that engine keeps, not a measurement.

use std::fmt::Write as _;

use anyhow::{bail, Result};

use super::config::{FloatDtype, ModelConfig};
use super::names::{expected_tensors, ExpectedTensor, TensorKind, EMBED_TOKENS, LM_HEAD};

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
    /// Tokens per lm_head + cross-entropy chunk (logits exist only for one chunk at a time).
    pub loss_chunk_tokens: usize,
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
    pub bytes: u64,
}

/// One buffer the engine must allocate; the largest decide whether chunking is needed.
#[derive(Debug, Clone, PartialEq)]
pub struct Buffer {
    pub name: String,
    pub bytes: u64,
    /// Bytes of one row: a chunked buffer is split between rows.
    pub row_bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    pub rows: Vec<PlanRow>,
    pub largest_buffers: Vec<Buffer>,
}

fn dtype_name(d: FloatDtype) -> &'static str {
    match d {
        FloatDtype::F32 => "f32",
        FloatDtype::F16 => "f16",
        FloatDtype::BF16 => "bf16",
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

        // Frozen base.
        match opts.base {
            BaseFormat::Nf4 { double_quant } => {
                let (mut packed, mut state) = (0, 0);
                for e in &lin {
                    let (p, s) = nf4_state_bytes(e.numel() as u64, double_quant);
                    packed += p;
                    state += s;
                    buffers.push(Buffer {
                        name: e.name.clone(),
                        bytes: p,
                        row_bytes: row_of(e).div_ceil(2),
                    });
                }
                rows.push(PlanRow {
                    part: "weights",
                    item: format!("{} Linear weights, NF4 packed codes", lin.len()),
                    dtype: "nf4",
                    elements: lin_elems,
                    bytes: packed,
                });
                rows.push(PlanRow {
                    part: "weights",
                    item: if double_quant {
                        "NF4 state: absmax (u8) + nested absmax (f32) + offsets + code tables"
                            .into()
                    } else {
                        "NF4 state: absmax (f32) + code table".into()
                    },
                    dtype: if double_quant { "u8/f32" } else { "f32" },
                    elements: lin_elems.div_ceil(64),
                    bytes: state,
                });
            }
            BaseFormat::Dense(d) => {
                for e in &lin {
                    buffers.push(Buffer {
                        name: e.name.clone(),
                        bytes: e.numel() as u64 * d.size() as u64,
                        row_bytes: row_of(e) * d.size() as u64,
                    });
                }
                rows.push(PlanRow {
                    part: "weights",
                    item: format!("{} Linear weights", lin.len()),
                    dtype: dtype_name(d),
                    elements: lin_elems,
                    bytes: lin_elems * d.size() as u64,
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
        for e in &others {
            buffers.push(Buffer {
                name: e.name.clone(),
                bytes: e.numel() as u64 * bd,
                row_bytes: row_of(e) * bd,
            });
        }
        let embed = others
            .iter()
            .find(|e| e.name == EMBED_TOKENS)
            .expect("always expected");
        let embed_elems = embed.numel() as u64;
        rows.push(PlanRow {
            part: "weights",
            item: if config.tie_word_embeddings() {
                "embed_tokens (tied lm_head shares it)".into()
            } else {
                "embed_tokens".into()
            },
            dtype: dtype_name(opts.base_dtype),
            elements: embed_elems,
            bytes: embed_elems * bd,
        });
        if let Some(head) = others.iter().find(|e| e.name == LM_HEAD) {
            let n = head.numel() as u64;
            rows.push(PlanRow {
                part: "weights",
                item: "lm_head".into(),
                dtype: dtype_name(opts.base_dtype),
                elements: n,
                bytes: n * bd,
            });
        }
        let rest: u64 = others
            .iter()
            .filter(|e| e.name != EMBED_TOKENS && e.name != LM_HEAD)
            .map(|e| e.numel() as u64)
            .sum();
        rows.push(PlanRow {
            part: "weights",
            item: "norms, biases, patch/position embeddings, projector".into(),
            dtype: dtype_name(opts.base_dtype),
            elements: rest,
            bytes: rest * bd,
        });

        // Trainable parameters: LoRA A/B in f32 with f32 grads and AdamW m, v.
        let mut lora_r = 0;
        let mut lora_modules = 0;
        if let Some(lora) = &opts.lora {
            lora_r = lora.r;
            lora_modules = lin.len();
            let params: u64 = lin
                .iter()
                .map(|e| (lora.r * (e.shape[0] + e.shape[1])) as u64)
                .sum();
            rows.push(PlanRow {
                part: "trainable",
                item: format!(
                    "LoRA A+B, r={} on {} modules (params + grads + AdamW m, v)",
                    lora.r,
                    lin.len()
                ),
                dtype: "f32",
                elements: params,
                bytes: params * 4 * 4,
            });
            for m in &lora.modules_to_save {
                let n = match m.as_str() {
                    "lm_head" | "embed_tokens" => embed_elems,
                    other => bail!("modules_to_save `{other}` is not known to the memory plan (lm_head, embed_tokens)"),
                };
                let d = lora.modules_to_save_dtype;
                rows.push(PlanRow {
                    part: "trainable",
                    item: format!("modules_to_save copy of {m} (params + grads + AdamW m, v)"),
                    dtype: dtype_name(d),
                    elements: n,
                    bytes: n * d.size() as u64 * 4,
                });
                buffers.push(Buffer {
                    name: format!("{m} (modules_to_save copy)"),
                    bytes: n * d.size() as u64,
                    row_bytes: config.text().hidden_size as u64 * d.size() as u64,
                });
            }
        }

        // Activations of one micro-batch.
        if let Some(act) = &opts.activations {
            let a = act.activation_dtype.size() as u64;
            let t = config.text();
            let tokens = (act.batch * act.seq_len) as u64;
            let (h, i, hd) = (
                t.hidden_size as u64,
                t.intermediate_size as u64,
                t.head_dim as u64,
            );
            let (nh, nkv) = (t.num_attention_heads as u64, t.num_key_value_heads as u64);
            let r = lora_r as u64;
            // Per token of one text layer: x, 4 norm outputs, q/k/v before and after norm+RoPE,
            // attention output, o_proj out, residual h, gate, up, gelu(gate), product, down out,
            // the LoRA x@A of its 7 Linears, and norm statistics.
            let text_per_token =
                8 * h + 2 * (nh * hd + 2 * nkv * hd) + nh * hd + 4 * i + 7 * r + 4 + nh + nkv;
            let text_probs = act.batch as u64 * nh * (act.seq_len as u64).pow(2) * 4;
            let text_layer = tokens * text_per_token * a + text_probs;
            let layers = t.num_hidden_layers as u64;
            let mut vision_layer = 0;
            let mut vision_layers = 0;
            let mut vision_tokens = 0;
            if let (ModelConfig::ConditionalGeneration(g), Some(v)) = (config, config.vision()) {
                let images = (act.batch * act.images_per_sample) as u64;
                let p = v.num_patches() as u64;
                vision_tokens = images * p;
                let (vh, vi, vn) = (
                    v.hidden_size as u64,
                    v.intermediate_size as u64,
                    v.num_attention_heads as u64,
                );
                // x, ln1, q, k, v, attention out, out_proj out, h, ln2, fc1, gelu, fc2, LoRA x@A (6), LN stats.
                let per_patch = 9 * vh + 2 * vi + 6 * r + 4;
                let probs = images * vn * p * p * 4;
                vision_layer = vision_tokens * per_patch * a + probs;
                vision_layers = v.num_hidden_layers as u64;
                // Patch embedding in/out, post-LN, projector pooled / normed / projected.
                let tpi = g.mm_tokens_per_image as u64;
                let head = vision_tokens * (v.patch_dim() as u64 + 2 * vh) * a
                    + images * tpi * (2 * vh + h) * a;
                rows.push(PlanRow {
                    part: "activations",
                    item: format!("vision embeddings, post-LN, projector ({images} images)"),
                    dtype: dtype_name(act.activation_dtype),
                    elements: head / a,
                    bytes: head,
                });
                buffers.push(Buffer {
                    name: "vision attention probabilities (one layer)".into(),
                    bytes: probs,
                    row_bytes: p * 4,
                });
            }
            let boundaries =
                tokens * h * a * layers + vision_tokens * v_hidden(config) * a * vision_layers;
            if act.gradient_checkpointing {
                rows.push(PlanRow {
                    part: "activations",
                    item: format!(
                        "checkpointed layer inputs ({layers} text + {vision_layers} vision layers)"
                    ),
                    dtype: dtype_name(act.activation_dtype),
                    elements: boundaries / a,
                    bytes: boundaries,
                });
                let one = text_layer.max(vision_layer);
                rows.push(PlanRow {
                    part: "activations",
                    item: "one layer recomputed in backward (largest of text / vision)".into(),
                    dtype: "mixed",
                    elements: 0,
                    bytes: one,
                });
            } else {
                rows.push(PlanRow {
                    part: "activations",
                    item: format!(
                        "{layers} text layers, all saved (incl. f32 attention probabilities)"
                    ),
                    dtype: "mixed",
                    elements: 0,
                    bytes: text_layer * layers,
                });
                if vision_layers > 0 {
                    rows.push(PlanRow {
                        part: "activations",
                        item: format!("{vision_layers} vision layers, all saved (incl. f32 attention probabilities)"),
                        dtype: "mixed",
                        elements: 0,
                        bytes: vision_layer * vision_layers,
                    });
                }
            }
            buffers.push(Buffer {
                name: "text attention probabilities (one layer)".into(),
                bytes: text_probs,
                row_bytes: act.seq_len as u64 * 4,
            });
            let chunk = act.loss_chunk_tokens.min(act.batch * act.seq_len) as u64;
            let vocab = t.vocab_size as u64;
            let edge = 4 * tokens * h * a + 2 * chunk * vocab * 4;
            rows.push(PlanRow {
                part: "activations",
                item: format!(
                    "embeddings, final norm, hidden-state grads, lm_head+loss chunk of {chunk} tokens (f32 logits + grad)"
                ),
                dtype: "mixed",
                elements: 0,
                bytes: edge,
            });
            buffers.push(Buffer {
                name: "logits chunk".into(),
                bytes: chunk * vocab * 4,
                row_bytes: vocab * 4,
            });
            let _ = lora_modules;
        }
        buffers.sort_by_key(|b| std::cmp::Reverse(b.bytes));
        buffers.truncate(5);
        Ok(MemoryPlan {
            rows,
            largest_buffers: buffers,
        })
    }

    pub fn total(&self) -> u64 {
        self.rows.iter().map(|r| r.bytes).sum()
    }

    pub fn part_total(&self, part: &str) -> u64 {
        self.rows
            .iter()
            .filter(|r| r.part == part)
            .map(|r| r.bytes)
            .sum()
    }

    /// The plan as a plain-text table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<12} {:<86} {:>7} {:>15} {:>16} {:>11}",
            "part", "item", "dtype", "elements", "bytes", ""
        );
        for r in &self.rows {
            let elems = if r.elements == 0 {
                "-".to_string()
            } else {
                r.elements.to_string()
            };
            let _ = writeln!(
                s,
                "{:<12} {:<86} {:>7} {:>15} {:>16} {:>11}",
                r.part,
                r.item,
                r.dtype,
                elems,
                r.bytes,
                human(r.bytes)
            );
        }
        for part in ["weights", "trainable", "activations"] {
            let t = self.part_total(part);
            if t > 0 {
                let _ = writeln!(
                    s,
                    "{:<12} {:<86} {:>7} {:>15} {:>16} {:>11}",
                    part,
                    "subtotal",
                    "",
                    "",
                    t,
                    human(t)
                );
            }
        }
        let _ = writeln!(
            s,
            "{:<12} {:<86} {:>7} {:>15} {:>16} {:>11}",
            "total",
            "",
            "",
            "",
            self.total(),
            human(self.total())
        );
        if let Some(b) = self.largest_buffers.first() {
            let _ = writeln!(s, "largest buffer: {} ({})", b.name, human(b.bytes));
        }
        s
    }

    /// Refuses a plan the adapter cannot hold: over the memory budget, or a buffer whose single
    /// row exceeds the binding/buffer limit (bigger buffers are split between rows into chunks).
    /// Returns the buffers that will be chunked.
    pub fn check(&self, limits: &DeviceLimits) -> Result<Vec<(String, u64)>> {
        if let Some(budget) = limits.memory_budget {
            if self.total() > budget {
                bail!(
                    "the model needs {} ({} bytes) on the device but the memory budget is {} ({} bytes):\n{}\
                     reduce the batch or sequence length, enable gradient checkpointing, use NF4, or raise the budget",
                    human(self.total()),
                    self.total(),
                    human(budget),
                    budget,
                    self.table()
                );
            }
        }
        let limit = limits
            .max_buffer_size
            .min(limits.max_storage_buffer_binding_size);
        let mut chunked = Vec::new();
        for b in &self.largest_buffers {
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

fn v_hidden(config: &ModelConfig) -> u64 {
    config.vision().map(|v| v.hidden_size as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::GEMMA_3_4B_IT_CONFIG_JSON;

    fn guide_options() -> PlanOptions {
        PlanOptions {
            base: BaseFormat::Nf4 { double_quant: true },
            base_dtype: FloatDtype::BF16,
            lora: Some(LoraPlan {
                r: 16,
                modules_to_save: vec!["lm_head".into(), "embed_tokens".into()],
                modules_to_save_dtype: FloatDtype::BF16,
            }),
            activations: Some(ActivationPlan {
                batch: 1,
                seq_len: 2048,
                images_per_sample: 1,
                gradient_checkpointing: true,
                activation_dtype: FloatDtype::F32,
                loss_chunk_tokens: 1024,
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
        assert_eq!(
            plan.part_total("trainable"),
            lora.bytes + 2 * 262_208 * 2560 * 2 * 4
        );
    }

    #[test]
    fn checkpointing_saves_memory_and_budget_refuses() {
        let c = ModelConfig::from_json(GEMMA_3_4B_IT_CONFIG_JSON).unwrap();
        let mut opts = guide_options();
        let with = MemoryPlan::build(&c, &opts).unwrap();
        opts.activations.as_mut().unwrap().gradient_checkpointing = false;
        let without = MemoryPlan::build(&c, &opts).unwrap();
        assert!(without.part_total("activations") > 5 * with.part_total("activations"));
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
        let tiny = DeviceLimits {
            max_buffer_size: 1024,
            max_storage_buffer_binding_size: 1024,
            memory_budget: None,
        };
        assert!(with
            .check(&tiny)
            .unwrap_err()
            .to_string()
            .contains("rows of"));
    }

    /// transformers 5.24 + bitsandbytes 0.50.2 `get_memory_footprint(return_buffers=False)` for
    /// gemma-3-4b-it in NF4 (tools/memory/bnb_footprint.py: the meta-device rule, validated
    /// against a real CPU 4-bit load of a tiny model): 3,170,589,408 bytes.
    #[test]
    fn matches_transformers_get_memory_footprint() {
        let c = ModelConfig::from_json(GEMMA_3_4B_IT_CONFIG_JSON).unwrap();
        assert_eq!(bnb_parameter_footprint(&c, FloatDtype::BF16), 3_170_589_408);
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
