//! Quantizes a checkpoint's Linear weights to NF4 exactly as transformers + bitsandbytes do
//! (`BitsAndBytesConfig(load_in_4bit=True, ...)` then `save_pretrained`): which modules, the
//! values quantized (the weight first cast to the load dtype), and the saved keys and state.
//!
//! Output folder: `model.safetensors` (base keys kept; each quantized `P.weight` replaced by the
//! bitsandbytes tensors `P.weight`, `P.weight.absmax`, `P.weight.quant_map`,
//! [`P.weight.nested_absmax`, `P.weight.nested_quant_map`,] `P.weight.quant_state.bitsandbytes__nf4`),
//! `config.json` with the `quantization_config` transformers writes, and every other file of the
//! base (tokenizer, processor, generation config) copied.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use safetensors::Dtype;

use super::bnb::{self, QuantState, QuantStorage, SkipRule};
use super::config::{FloatDtype, ModelConfig};
use super::names::{hf_module_path, TensorKind, EMBED_TOKENS};
use super::safetensors_io::{write_safetensors, OutTensor, INDEX_FILE, SINGLE_FILE};
use super::weights::Weights;
use engine::reference::nf4;

/// `BitsAndBytesConfig` fields this op honours, plus the load dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeOptions {
    /// `bnb_4bit_use_double_quant`.
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype`: recorded in the config (the forward's matmul dtype).
    pub compute_dtype: FloatDtype,
    /// `bnb_4bit_quant_storage`.
    pub quant_storage: QuantStorage,
    /// `llm_int8_skip_modules`: when set, replaces transformers' default skip list.
    pub skip_modules: Option<Vec<String>>,
    /// How the skip list matches module paths (transformers 5, or 4.x as in the guide's era).
    pub skip_rule: SkipRule,
    /// The dtype the weights are loaded in before quantization (`dtype=` / `torch_dtype=` of
    /// `from_pretrained`); `None` keeps each tensor's stored dtype.
    pub load_dtype: Option<FloatDtype>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct QuantizeReport {
    pub quantized_modules: usize,
    pub quantized_params: u64,
    pub kept_tensors: usize,
    pub skipped_linears: Vec<String>,
    pub unexpected_keys: Vec<String>,
}

/// transformers' `get_keys_to_not_convert` for Gemma 3: the tied pair (lm_head, embed_tokens),
/// the output embedding, and the module of the last parameter (the text `norm`, which is no
/// Linear). In transformers' module paths.
pub fn default_skip_modules(config: &ModelConfig) -> Vec<String> {
    let causal = matches!(config, ModelConfig::CausalLm(_));
    let mut v = vec!["lm_head".to_string()];
    if config.tie_word_embeddings() {
        v.push(hf_module_path(
            EMBED_TOKENS.trim_end_matches(".weight"),
            causal,
        ));
    }
    v.push(hf_module_path("model.language_model.norm", causal));
    v
}

/// Whether transformers would leave this Linear unquantized.
fn is_skipped(module: &str, causal: bool, patterns: &[String], rule: SkipRule) -> Result<bool> {
    let path = hf_module_path(module, causal);
    for p in patterns {
        if rule.matches(&path, p)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The `quantization_config` transformers 5.24 writes into config.json for these options.
pub fn quantization_config_json(opts: &QuantizeOptions) -> serde_json::Value {
    serde_json::json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": opts.compute_dtype.torch_name(),
        "bnb_4bit_quant_storage": opts.quant_storage.torch_name(),
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": opts.double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": opts.skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

fn float_bytes(values: &[f32], dtype: FloatDtype) -> Vec<u8> {
    match dtype {
        FloatDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        FloatDtype::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        FloatDtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        // Integer types (not a weight's; here for completeness): the nearest value in range.
        FloatDtype::I64 => values
            .iter()
            .flat_map(|v| (dtype.round(*v) as i64).to_le_bytes())
            .collect(),
        FloatDtype::U32 => values
            .iter()
            .flat_map(|v| (dtype.round(*v) as u32).to_le_bytes())
            .collect(),
        FloatDtype::U8 => values.iter().map(|v| dtype.round(*v) as u8).collect(),
    }
}

fn f32_tensor(values: &[f32]) -> OutTensor<'static> {
    OutTensor {
        dtype: Dtype::F32,
        shape: vec![values.len()],
        data: Cow::Owned(float_bytes(values, FloatDtype::F32)),
    }
}

/// The bitsandbytes tensors of one quantized weight, keyed by suffix after `P.weight`.
pub fn quantize_linear(
    values: &[f32],
    shape: &[usize],
    dtype: FloatDtype,
    opts: &QuantizeOptions,
) -> Result<Vec<(&'static str, OutTensor<'static>)>> {
    let (packed, absmax) = nf4::quantize_nf4(values, bnb::BLOCKSIZE);
    let mut state = QuantState {
        quant_type: "nf4".into(),
        blocksize: bnb::BLOCKSIZE,
        dtype: dtype.torch_name().into(),
        shape: shape.to_vec(),
        nested_blocksize: None,
        nested_dtype: None,
        nested_offset: None,
    };
    let packed_shape = opts.quant_storage.shape(packed.len())?;
    let mut out = vec![(
        "",
        OutTensor {
            dtype: opts.quant_storage.dtype(),
            shape: packed_shape,
            data: Cow::Owned(packed),
        },
    )];
    if opts.double_quant {
        let (q8, nested_absmax, offset) = nf4::double_quantize(&absmax, bnb::NESTED_BLOCKSIZE);
        state.nested_blocksize = Some(bnb::NESTED_BLOCKSIZE);
        state.nested_dtype = Some("float32".into());
        state.nested_offset = Some(offset as f64);
        out.push((
            bnb::ABSMAX,
            OutTensor {
                dtype: Dtype::U8,
                shape: vec![q8.len()],
                data: Cow::Owned(q8),
            },
        ));
        out.push((bnb::QUANT_MAP, f32_tensor(&nf4::NF4_CODE)));
        out.push((bnb::NESTED_ABSMAX, f32_tensor(&nested_absmax)));
        out.push((
            bnb::NESTED_QUANT_MAP,
            f32_tensor(&nf4::dynamic_map_signed()),
        ));
    } else {
        out.push((bnb::ABSMAX, f32_tensor(&absmax)));
        out.push((bnb::QUANT_MAP, f32_tensor(&nf4::NF4_CODE)));
    }
    let json = state.to_json().into_bytes();
    out.push((
        bnb::QUANT_STATE_NF4,
        OutTensor {
            dtype: Dtype::U8,
            shape: vec![json.len()],
            data: Cow::Owned(json),
        },
    ));
    Ok(out)
}

/// Quantizes the checkpoint in `src_dir` (config.json + safetensors) into `out_dir`.
pub fn quantize_checkpoint(
    src_dir: &Path,
    out_dir: &Path,
    opts: &QuantizeOptions,
    on_progress: &(dyn Fn(u64) + Sync),
) -> Result<QuantizeReport> {
    let config_path = src_dir.join("config.json");
    let config = ModelConfig::from_file(&config_path)?;
    let raw_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path)?)?;
    if raw_config.get("quantization_config").is_some() {
        bail!(
            "{}: the model is already quantized (config.json has `quantization_config`); connect the unquantized base",
            config_path.display()
        );
    }
    let weights = Weights::open(src_dir, &config)?;
    let causal = matches!(config, ModelConfig::CausalLm(_));
    let patterns = opts
        .skip_modules
        .clone()
        .unwrap_or_else(|| default_skip_modules(&config));

    let mut report = QuantizeReport {
        unexpected_keys: weights.unexpected().to_vec(),
        ..Default::default()
    };
    let mut to_quantize = Vec::new();
    let mut kept = Vec::new();
    for e in weights.expected() {
        if !weights.contains(&e.name) {
            continue; // an optional tensor (tied lm_head) the checkpoint lacks
        }
        if weights.is_nf4(&e.name) {
            bail!(
                "{}: tensor `{}` is already 4-bit quantized",
                src_dir.display(),
                e.name
            );
        }
        let linear = matches!(
            e.kind,
            TensorKind::LinearWeight | TensorKind::OutputEmbedding
        );
        if linear && !is_skipped(e.module(), causal, &patterns, opts.skip_rule)? {
            to_quantize.push(e);
        } else {
            if linear {
                report.skipped_linears.push(e.name.clone());
            }
            kept.push(e);
        }
    }

    // Quantize in parallel: each weight is cast to the load dtype first, as from_pretrained does.
    let quantized: Vec<(String, Vec<(&'static str, OutTensor<'static>)>)> = to_quantize
        .par_iter()
        .map(|e| {
            let t = weights.tensor(&e.name)?;
            let dtype = opts
                .load_dtype
                .or(t.float_dtype())
                .expect("dense tensors are float");
            let mut values = t.to_f32()?;
            values.iter_mut().for_each(|v| *v = dtype.round(*v));
            let parts = quantize_linear(&values, &e.shape, dtype, opts)
                .with_context(|| format!("{}: tensor `{}`", t.file.display(), t.key))?;
            on_progress(e.numel() as u64);
            Ok((t.key.to_string(), parts))
        })
        .collect::<Result<_>>()?;

    let mut tensors: BTreeMap<String, OutTensor<'_>> = BTreeMap::new();
    for (key, parts) in quantized {
        report.quantized_modules += 1;
        for (suffix, t) in parts {
            tensors.insert(format!("{key}{suffix}"), t);
        }
    }
    report.quantized_params = to_quantize.iter().map(|e| e.numel() as u64).sum();
    for e in kept {
        let t = weights.tensor(&e.name)?;
        let src = t.float_dtype().expect("dense tensors are float");
        let out = match opts.load_dtype {
            Some(d) if d != src => OutTensor {
                dtype: d.to_safetensors(),
                shape: t.shape.to_vec(),
                data: Cow::Owned(float_bytes(&t.to_f32()?, d)),
            },
            _ => OutTensor {
                dtype: t.dtype,
                shape: t.shape.to_vec(),
                data: Cow::Borrowed(t.bytes),
            },
        };
        tensors.insert(t.key.to_string(), out);
        report.kept_tensors += 1;
    }
    std::fs::create_dir_all(out_dir)?;
    write_safetensors(&out_dir.join(SINGLE_FILE), &tensors)?;

    // config.json: the base's, with the quantization config and the load dtype.
    let mut cfg = raw_config;
    let obj = cfg
        .as_object_mut()
        .context("config.json must be an object")?;
    let mut recorded = opts.clone();
    if opts.skip_rule == SkipRule::Contains {
        // transformers 5 reads the list with its boundary rule when it loads this checkpoint:
        // the full path of every Linear the 4.x rule skipped makes both generations agree
        let names = recorded.skip_modules.get_or_insert_with(Vec::new);
        for name in &report.skipped_linears {
            let path = hf_module_path(name.trim_end_matches(".weight"), causal);
            if !names.contains(&path) {
                names.push(path);
            }
        }
    }
    obj.insert(
        "quantization_config".into(),
        quantization_config_json(&recorded),
    );
    if let Some(d) = opts.load_dtype {
        obj.insert(
            "dtype".into(),
            serde_json::Value::String(d.torch_name().into()),
        );
        obj.remove("torch_dtype");
    }
    op_api::atomic_file::write(
        &out_dir.join("config.json"),
        (serde_json::to_string_pretty(&cfg)? + "\n").as_bytes(),
    )?;

    // Every other file of the base (tokenizer, processor, generation config, chat template).
    copy_other_files(src_dir, out_dir)?;
    Ok(report)
}

/// Copies the base folder's files except weights, config.json and model.json (resolving the
/// HF cache's symlinks: the output holds real files).
fn copy_other_files(src: &Path, dst: &Path) -> Result<()> {
    for entry in walk(src)? {
        let rel = entry.strip_prefix(src).expect("under src");
        let name = rel.to_string_lossy();
        if name == "config.json"
            || name == "model.json"
            || name == INDEX_FILE
            || name.ends_with(".safetensors")
            || name.starts_with('.')
        {
            continue;
        }
        let to = dst.join(rel);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(&entry, &to)
            .with_context(|| format!("copying {} to {}", entry.display(), to.display()))?;
    }
    Ok(())
}

fn walk(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(walk(&path)?);
        } else {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}
