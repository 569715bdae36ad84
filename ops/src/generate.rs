//! Op `generate`: answers of the model (dense or NF4, with an optional adapter) to conversations,
//! as transformers' `model.generate` gives them: each conversation's messages but a trailing
//! assistant one (kept as the reference) are rendered with the chat template and
//! `add_generation_prompt = true`, tokenized as `collate` tokenizes for training, their images
//! processed as in training; batches are left-padded; the vision tower runs once per prompt and
//! decoding uses a KV cache on the GPU (`model::gpu::kv_cache`). Greedy by default; sampling with
//! temperature / top-k / top-p is reproducible for a seed (each row has its own random stream,
//! so the answers do not depend on `batch_size`). A row stops on one of generation_config.json's
//! `eos_token_id`s (Gemma: `<eos>`, `<end_of_turn>`) or after `max_new_tokens`.
//!
//! Output: `generations.jsonl` (one [`GenerationRecord`] per conversation, in order) and
//! `generate.json` (rows, new tokens, decode time, tokens/s, KV cache bytes).

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::data::chat_template::ChatTemplate;
use crate::data::processor::Processor;
use crate::generation::config::GenerationConfig;
use crate::generation::decode::{answer_all, read_prompts, DecodeOptions};
use crate::gpu::MatmulPrecision;
use crate::model::gpu::model::Gemma3Gpu;
use crate::model::ModelConfig;
use crate::params::OpParams;
use crate::{op_params, ArtifactType, Device, Op, ParamError, ParamSpec, Port, RunCtx};

/// The answers, one JSON record per line.
pub const GENERATIONS_FILE: &str = "generations.jsonl";
/// The run's summary.
pub const GENERATE_JSON: &str = "generate.json";

op_params! {
    pub struct GenerateParams {
        /// New tokens per answer at most (the stop token included).
        max_new_tokens: usize = 128,
        /// false: greedy decoding (transformers' `do_sample=False`); true: sample with temperature, top_k and top_p.
        do_sample: bool = false,
        /// Sampling temperature (> 0); unset: generation_config.json's, else 1.0.
        temperature: Option<f64> = None,
        /// Sample among the k most likely tokens (0: all); unset: generation_config.json's, else 50 (transformers' default).
        top_k: Option<usize> = None,
        /// Sample from the smallest set of tokens whose probability exceeds top_p (1.0: all); unset: generation_config.json's, else 1.0.
        top_p: Option<f64> = None,
        /// Seed of the sampling (each row draws from its own stream of it); unset: the recipe's seed.
        seed: Option<u64> = None,
        /// Prompts decoded together (left-padded, as transformers pads for generation).
        batch_size: usize = 1,
        /// Answer only the first N conversations; unset: all.
        max_rows: Option<usize> = None,
        /// Let the tokenizer add its special tokens (a BOS) as the collate op does for training (its default, true: the guide's double BOS with Gemma's template).
        add_special_tokens: bool = true,
        /// Operand precision of the frozen base's linear layers: "f32" or "f16".
        matmul_precision: String = "f32".to_string(),
    }
}

impl GenerateParams {
    fn validate(&self) -> Result<(), ParamError> {
        if self.max_new_tokens == 0 {
            return Err(ParamError::at(
                "max_new_tokens",
                "`max_new_tokens` must be at least 1",
            ));
        }
        if self.batch_size == 0 {
            return Err(ParamError::at(
                "batch_size",
                "`batch_size` must be at least 1",
            ));
        }
        if let Some(t) = self.temperature {
            if !(t > 0.0 && t.is_finite()) {
                return Err(ParamError::at(
                    "temperature",
                    format!(
                        "`temperature` must be a positive number, got {t} (for greedy decoding set `do_sample = false`)"
                    ),
                ));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ParamError::at(
                    "top_p",
                    format!("`top_p` must be in (0, 1], got {p}"),
                ));
            }
        }
        MatmulPrecision::parse(&self.matmul_precision)
            .map_err(|e| ParamError::at("matmul_precision", format!("matmul_precision: {e}")))?;
        Ok(())
    }
}

pub struct GenerateOp;

impl Op for GenerateOp {
    fn kind(&self) -> &'static str {
        "generate"
    }
    fn doc(&self) -> &'static str {
        "Answers of the model (+ adapter) to conversations, as transformers' generate: greedy or sampled, KV cache on the GPU; writes generations.jsonl"
    }
    fn inputs(&self) -> Vec<Port> {
        vec![
            Port {
                name: "conversations",
                accepts: &[ArtifactType::Conversations],
                required: true,
                doc: "formatted conversations (format); a trailing assistant message is the reference answer, not part of the prompt",
            },
            Port {
                name: "model",
                accepts: &[ArtifactType::Model, ArtifactType::QuantizedModel],
                required: true,
                doc: "the base model (dense or NF4)",
            },
            Port {
                name: "adapter",
                accepts: &[ArtifactType::Adapter],
                required: false,
                doc: "a LoRA adapter (lora-train, or load with repo_type = \"adapter\"); unset answers with the base model",
            },
        ]
    }
    fn params(&self) -> Vec<ParamSpec> {
        GenerateParams::specs()
    }
    fn version(&self) -> u32 {
        1
    }
    fn device(&self) -> Device {
        Device::Gpu
    }
    fn check(&self, params: &toml::Table) -> Result<toml::Table, ParamError> {
        GenerateParams::from_table(params)?.validate()?;
        GenerateParams::canonical(params)
    }
    fn output(&self, _params: &toml::Table) -> ArtifactType {
        ArtifactType::Generations
    }
    /// Sampling without its own `seed` takes the recipe's, which is not among its params;
    /// greedy answers depend on no seed.
    fn fingerprint(
        &self,
        params: &toml::Table,
        recipe: &crate::RecipeInfo,
    ) -> Result<Option<String>> {
        let p = GenerateParams::from_table(params)?;
        Ok((p.do_sample && p.seed.is_none()).then(|| format!("recipe seed {}", recipe.seed)))
    }
    fn run(&self, ctx: &RunCtx) -> Result<()> {
        let params = GenerateParams::from_table(ctx.params)?;
        let op = format!("op `{}` (generate)", ctx.name);
        let (root, _) = crate::model::artifact_model_root(&ctx.input("model")?.dir)?;
        let config = ModelConfig::from_file(&root.join("config.json"))?;
        let gen_config = GenerationConfig::read(&root).with_context(|| op.clone())?;
        let stop_ids = gen_config.stop_ids(&config).with_context(|| op.clone())?;
        let adapter = ctx.optional_input("adapter");
        let processor = Processor::from_model_dir(&root).with_context(|| op.clone())?;
        let template = ChatTemplate::from_model_dir(&root, None).with_context(|| op.clone())?;
        let opts = DecodeOptions {
            max_new_tokens: params.max_new_tokens,
            do_sample: params.do_sample,
            temperature: params.temperature.or(gen_config.temperature).unwrap_or(1.0),
            top_k: params.top_k.or(gen_config.top_k).unwrap_or(50),
            top_p: params.top_p.or(gen_config.top_p).unwrap_or(1.0),
            seed: params.seed.unwrap_or(ctx.recipe.seed),
            stop_ids,
            pad_id: gen_config
                .pad_token_id
                .map(|p| p as u32)
                .unwrap_or(processor.ids.pad),
            run_ahead: None,
        };
        let (prompts, resolver) = read_prompts(
            &ctx.input("conversations")?.dir,
            &template,
            &processor,
            params.add_special_tokens,
            params.max_rows,
        )
        .with_context(|| op.clone())?;
        if prompts.is_empty() {
            bail!("{op}: there are no conversations to answer");
        }
        let longest = prompts.iter().map(|p| p.input_ids.len()).max().unwrap_or(0);
        let max_positions = config.text().max_position_embeddings;
        if longest + params.max_new_tokens > max_positions {
            bail!(
                "{op}: a prompt of {longest} tokens plus max_new_tokens = {} exceeds the model's \
                 max_position_embeddings = {max_positions}; lower `max_new_tokens` or drop the long rows",
                params.max_new_tokens
            );
        }

        let gpu = crate::gpu::Gpu::get()?;
        // f32 tables: an adapter trained with `bf16` holds bf16 values, exact in f32
        let model = Gemma3Gpu::for_inference(
            gpu,
            &root,
            &config,
            adapter.map(|a| a.dir.as_path()),
            MatmulPrecision::parse(&params.matmul_precision)?,
            false,
        )
        .with_context(|| op.clone())?;
        // The plan's KV cache row: what the decode will hold for the largest batch.
        let kv_plan = crate::model::memory::kv_cache_row(
            &config,
            params.batch_size.min(prompts.len()),
            longest + params.max_new_tokens,
            gpu.max_binding_bytes(),
        );

        let out_path = ctx.out_dir.join(GENERATIONS_FILE);
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(&out_path)
                .with_context(|| format!("creating {}", out_path.display()))?,
        );
        // frozen weights staged once for all batches (CPU adapters), not once per batch
        let _staged_weights = gpu.hold_staged_weights();
        let totals = answer_all(
            &model,
            gpu,
            &processor,
            &resolver,
            &prompts,
            params.batch_size,
            &opts,
            &mut out,
            ctx.progress,
        )
        .with_context(|| op.clone())?;
        let rate = totals.new_tokens as f64 / totals.seconds.max(1e-9);
        std::fs::write(
            ctx.out_dir.join(GENERATE_JSON),
            serde_json::to_string_pretty(&json!({
                "rows": prompts.len(),
                "new_tokens": totals.new_tokens,
                "stopped_on_eos": totals.stopped,
                "seconds": totals.seconds,
                "tokens_per_second": rate,
                "kv_cache_bytes": kv_plan.bytes,
                "kv_cache_device_bytes": kv_plan.device_bytes,
                "do_sample": opts.do_sample,
                "adapter": adapter.is_some(),
            }))?,
        )?;
        ctx.progress.println(format!(
            "{} answers, {} new tokens in {:.2}s ({rate:.1} tokens/s), {} stopped on eos; KV cache {:.1} MiB",
            prompts.len(),
            totals.new_tokens,
            totals.seconds,
            totals.stopped,
            kv_plan.bytes as f64 / (1 << 20) as f64
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_params_name_the_param_and_the_fix() {
        for (toml, key, says) in [
            ("max_new_tokens = 0", "max_new_tokens", "at least 1"),
            ("batch_size = 0", "batch_size", "at least 1"),
            ("temperature = 0.0", "temperature", "do_sample = false"),
            ("top_p = 1.5", "top_p", "(0, 1]"),
            (
                "matmul_precision = \"f8\"",
                "matmul_precision",
                "matmul_precision",
            ),
        ] {
            let err = GenerateOp.check(&toml.parse().unwrap()).unwrap_err();
            assert_eq!(err.key.as_deref(), Some(key), "{toml}");
            assert!(err.message.contains(says), "{toml}: {}", err.message);
        }
        let ok = GenerateOp.check(&toml::Table::new()).unwrap();
        assert_eq!(ok["max_new_tokens"].as_integer(), Some(128));
        assert_eq!(ok["do_sample"].as_bool(), Some(false));
    }
}
