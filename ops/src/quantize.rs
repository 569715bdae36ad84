//! Op `quantize`: a `model` to a `quantized-model` — every Linear weight except lm_head to NF4
//! with bitsandbytes' layout and key names (see `model::quantize`).

use anyhow::Result;

use crate::model::bnb::{QuantStorage, SkipRule};
use crate::model::config::FloatDtype;
use crate::model::quantize::{quantize_checkpoint, QuantizeOptions};
use crate::params::OpParams;
use crate::{op_params, ArtifactType, Device, Op, ParamError, ParamSpec, Port, RunCtx};

op_params! {
    pub struct QuantizeParams {
        /// `BitsAndBytesConfig.bnb_4bit_quant_type`: only "nf4" is implemented.
        bnb_4bit_quant_type: String = "nf4".into(),
        /// `bnb_4bit_use_double_quant`: quantize the per-block absmax to 8 bits (blocks of 256).
        bnb_4bit_use_double_quant: bool = true,
        /// `bnb_4bit_compute_dtype`: dtype of the matmuls against the dequantized weights.
        bnb_4bit_compute_dtype: String = "bfloat16".into(),
        /// `bnb_4bit_quant_storage`: dtype the packed codes are stored as (same bytes; the guide: bfloat16; bitsandbytes' default: uint8).
        bnb_4bit_quant_storage: String = "bfloat16".into(),
        /// `llm_int8_skip_modules`: modules left unquantized; replaces the default (lm_head) when set.
        llm_int8_skip_modules: Option<Vec<String>> = None,
        /// How `llm_int8_skip_modules` matches module paths: "boundary" (transformers 5: from the start of the path up to a module boundary, as a regex, or as a suffix; `vision_tower` alone matches nothing) or "contains" (transformers 4.x, the guide's era: the module's own name, or `NAME.` anywhere in its path, so `vision_tower` skips the whole vision tower).
        skip_modules_rule: String = "boundary".into(),
        /// dtype the weights are loaded in before quantization (`from_pretrained(dtype=...)`; the guide: bfloat16); "auto" keeps the checkpoint's.
        dtype: String = "bfloat16".into(),
    }
}

struct Parsed {
    options: QuantizeOptions,
}

fn parse(params: &QuantizeParams) -> Result<Parsed, ParamError> {
    match params.bnb_4bit_quant_type.as_str() {
        "nf4" => {}
        "fp4" => {
            return Err(ParamError::at(
                "bnb_4bit_quant_type",
                "bnb_4bit_quant_type = \"fp4\" is not supported: only NF4 (the QLoRA setting) is implemented; use \"nf4\"",
            ))
        }
        other => {
            return Err(ParamError::at(
                "bnb_4bit_quant_type",
                format!("bnb_4bit_quant_type must be \"nf4\", got \"{other}\""),
            ))
        }
    }
    let compute_dtype = FloatDtype::parse_float(&params.bnb_4bit_compute_dtype).map_err(|e| {
        ParamError::at(
            "bnb_4bit_compute_dtype",
            format!("bnb_4bit_compute_dtype: {e}"),
        )
    })?;
    let quant_storage = QuantStorage::parse(&params.bnb_4bit_quant_storage)
        .map_err(|e| ParamError::at("bnb_4bit_quant_storage", e.to_string()))?;
    let load_dtype = match params.dtype.as_str() {
        "auto" => None,
        d => Some(
            FloatDtype::parse_float(d)
                .map_err(|e| ParamError::at("dtype", format!("dtype: {e} or \"auto\"")))?,
        ),
    };
    let skip_rule = SkipRule::parse(&params.skip_modules_rule)
        .map_err(|e| ParamError::at("skip_modules_rule", format!("skip_modules_rule: {e}")))?;
    if let Some(skip) = &params.llm_int8_skip_modules {
        for p in skip {
            regex::Regex::new(p).map_err(|e| {
                ParamError::at(
                    "llm_int8_skip_modules",
                    format!("llm_int8_skip_modules: `{p}` is not a valid pattern: {e}"),
                )
            })?;
        }
    }
    Ok(Parsed {
        options: QuantizeOptions {
            double_quant: params.bnb_4bit_use_double_quant,
            compute_dtype,
            quant_storage,
            skip_modules: params.llm_int8_skip_modules.clone(),
            skip_rule,
            load_dtype,
        },
    })
}

/// The `quantize` op.
pub struct Quantize;

impl Op for Quantize {
    fn kind(&self) -> &'static str {
        "quantize"
    }

    fn doc(&self) -> &'static str {
        "Quantize a model's Linear weights (all but lm_head, SigLIP's included) to NF4 as bitsandbytes lays them out"
    }

    fn inputs(&self) -> Vec<Port> {
        vec![Port {
            name: "model",
            accepts: &[ArtifactType::Model],
            required: true,
            doc: "the base model (config.json + safetensors)",
        }]
    }

    fn params(&self) -> Vec<ParamSpec> {
        QuantizeParams::specs()
    }

    fn version(&self) -> u32 {
        1
    }

    fn device(&self) -> Device {
        // Plain Rust on rayon: quantization is a one-off, memory-bound pass over the weights.
        Device::Cpu
    }

    fn check(&self, params: &toml::Table) -> Result<toml::Table, ParamError> {
        let p = QuantizeParams::from_table(params)?;
        parse(&p)?;
        QuantizeParams::canonical(params)
    }

    fn output(&self, _params: &toml::Table) -> ArtifactType {
        ArtifactType::QuantizedModel
    }

    fn run(&self, ctx: &RunCtx) -> Result<()> {
        let params = QuantizeParams::from_table(ctx.params)?;
        let parsed = parse(&params)?;
        let input = ctx.input("model")?;
        let (root, model_json) = crate::model::artifact_model_root(&input.dir)?;
        let root = root.as_path();
        let total: u64 = {
            let config = crate::model::ModelConfig::from_file(&root.join("config.json"))?;
            crate::model::names::expected_tensors(&config)
                .iter()
                .filter(|e| e.kind == crate::model::names::TensorKind::LinearWeight)
                .map(|e| e.numel() as u64)
                .sum()
        };
        ctx.progress.set_length(total);
        let report =
            quantize_checkpoint(root, ctx.out_dir, &parsed.options, &|n| ctx.progress.inc(n))?;
        for key in &report.unexpected_keys {
            ctx.progress.println(format!("warning: tensor `{key}` is not part of the model; dropped (as transformers drops unexpected keys)"));
        }
        ctx.progress.println(format!(
            "quantized {} Linear weights ({} parameters) to NF4; kept {} tensors; left unquantized: {}",
            report.quantized_modules,
            report.quantized_params,
            report.kept_tensors,
            if report.skipped_linears.is_empty() { "none".to_string() } else { report.skipped_linears.join(", ") }
        ));
        let out_json = serde_json::json!({
            "repo_id": model_json.get("repo_id").cloned().unwrap_or(serde_json::Value::Null),
            "revision": model_json.get("revision").cloned().unwrap_or(serde_json::Value::Null),
            // Relative: the runner moves this directory into the cache after `run` returns.
            "root": ".",
        });
        std::fs::write(
            ctx.out_dir.join("model.json"),
            serde_json::to_string_pretty(&out_json)? + "\n",
        )?;
        Ok(())
    }
}
