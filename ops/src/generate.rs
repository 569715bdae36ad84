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

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::data::chat_template::ChatTemplate;
use crate::data::collate::{DatasetImages, ImageResolver, RowImages};
use crate::data::conversation::{read_jsonl, ConversationRecord, ImageRef, ImageSources};
use crate::data::processor::Processor;
use crate::generation::decode::{
    build_prompt, generate_batch, left_padded_batch, load_images, DecodeOptions, Prompt,
};
use crate::generation::GenerationRecord;
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

fn param_error(key: &str, message: String) -> ParamError {
    ParamError {
        key: Some(key.into()),
        message,
    }
}

impl GenerateParams {
    fn validate(&self) -> Result<(), ParamError> {
        if self.max_new_tokens == 0 {
            return Err(param_error(
                "max_new_tokens",
                "`max_new_tokens` must be at least 1".into(),
            ));
        }
        if self.batch_size == 0 {
            return Err(param_error(
                "batch_size",
                "`batch_size` must be at least 1".into(),
            ));
        }
        if let Some(t) = self.temperature {
            if !(t > 0.0 && t.is_finite()) {
                return Err(param_error(
                    "temperature",
                    format!(
                        "`temperature` must be a positive number, got {t} (for greedy decoding set `do_sample = false`)"
                    ),
                ));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(param_error(
                    "top_p",
                    format!("`top_p` must be in (0, 1], got {p}"),
                ));
            }
        }
        MatmulPrecision::parse(&self.matmul_precision)
            .map_err(|e| param_error("matmul_precision", format!("matmul_precision: {e}")))?;
        Ok(())
    }
}

/// What generation_config.json says (transformers reads the same file).
#[derive(Debug, Default, serde::Deserialize)]
struct GenerationConfig {
    eos_token_id: Option<crate::params::OneOrMany<i64>>,
    pad_token_id: Option<i64>,
    temperature: Option<f64>,
    top_k: Option<usize>,
    top_p: Option<f64>,
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
        let gen_config: GenerationConfig = match std::fs::read(root.join("generation_config.json"))
        {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{op}: reading generation_config.json"))?,
            Err(_) => GenerationConfig::default(),
        };
        let stop_ids: Vec<u32> = gen_config
            .eos_token_id
            .as_ref()
            .or(match &config {
                ModelConfig::ConditionalGeneration(g) => g.eos_token_id.as_ref(),
                _ => None,
            })
            .or(config.text().eos_token_id.as_ref())
            .map(|e| e.to_vec().into_iter().map(|v| v as u32).collect())
            .unwrap_or_default();
        if stop_ids.is_empty() {
            bail!(
                "{op}: the model names no `eos_token_id` (generation_config.json or config.json): \
                 answers would never stop before max_new_tokens; add it to the model folder"
            );
        }
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
        };

        let conv_dir = &ctx.input("conversations")?.dir;
        let records: Vec<ConversationRecord> = read_jsonl(&conv_dir.join("conversations.jsonl"))
            .with_context(|| format!("{op}: reading the conversations"))?;
        let sources = ImageSources::read(conv_dir)
            .with_context(|| format!("{op}: the conversations artifact has no source.json"))?;
        let rows: Option<std::sync::Arc<dyn RowImages>> = match &sources.dataset_dir {
            Some(d) => Some(std::sync::Arc::new(DatasetImages(
                crate::data::dataset::open(d)?,
            ))),
            None => None,
        };
        let resolver = ImageResolver { sources, rows };
        let limit = params.max_rows.unwrap_or(records.len()).min(records.len());
        let prompts = records[..limit]
            .iter()
            .map(|r| build_prompt(r, &template, &processor, params.add_special_tokens))
            .collect::<Result<Vec<Prompt>>>()
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
        let cache_bytes = kv_plan.bytes;

        ctx.progress
            .set_length((prompts.len() * params.max_new_tokens) as u64);
        let out_path = ctx.out_dir.join(GENERATIONS_FILE);
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(&out_path)
                .with_context(|| format!("creating {}", out_path.display()))?,
        );
        // frozen weights staged once for all batches (CPU adapters), not once per batch
        let _staged_weights = gpu.hold_staged_weights();
        let started = Instant::now();
        let (mut new_tokens, mut stopped) = (0usize, 0usize);
        for chunk in prompts.chunks(params.batch_size) {
            let images = chunk
                .iter()
                .map(|p| load_images(&resolver, p))
                .collect::<Result<Vec<_>>>()
                .with_context(|| op.clone())?;
            let batch = left_padded_batch(&processor, chunk, &images);
            let before = new_tokens;
            let answers = generate_batch(&model, gpu, &batch, &opts, |n| {
                new_tokens += n;
                let secs = started.elapsed().as_secs_f64();
                ctx.progress.inc(n as u64);
                ctx.progress.message(format!(
                    "{:.1} tokens/s",
                    new_tokens as f64 / secs.max(1e-9)
                ));
            })
            .with_context(|| format!("{op}: rows {:?}", batch.rows))?;
            for (prompt, answer) in chunk.iter().zip(answers) {
                stopped += answer.stopped as usize;
                let record = GenerationRecord {
                    row: prompt.row,
                    prompt: prompt.text.clone(),
                    reference: prompt.reference.clone(),
                    text: processor
                        .tokenizer
                        .decode(&answer.token_ids, true)
                        .map_err(|e| anyhow::anyhow!("{op}: decoding the answer: {e}"))?,
                    token_ids: answer.token_ids,
                    finish_reason: Some(if answer.stopped { "eos" } else { "length" }.into()),
                    images: prompt.images.iter().map(image_name).collect(),
                };
                serde_json::to_writer(&mut out, &record)?;
                out.write_all(b"\n")?;
            }
            // Rows that stopped early leave part of their budget: the bar counts it as done.
            ctx.progress.inc(
                (chunk.len() * params.max_new_tokens).saturating_sub(new_tokens - before) as u64,
            );
        }
        out.flush()?;
        let secs = started.elapsed().as_secs_f64();
        let rate = new_tokens as f64 / secs.max(1e-9);
        std::fs::write(
            ctx.out_dir.join(GENERATE_JSON),
            serde_json::to_string_pretty(&json!({
                "rows": prompts.len(),
                "new_tokens": new_tokens,
                "stopped_on_eos": stopped,
                "seconds": secs,
                "tokens_per_second": rate,
                "kv_cache_bytes": cache_bytes,
                "kv_cache_device_bytes": kv_plan.device_bytes,
                "do_sample": opts.do_sample,
                "adapter": adapter.is_some(),
            }))?,
        )?;
        ctx.progress.println(format!(
            "{} answers, {new_tokens} new tokens in {secs:.2}s ({rate:.1} tokens/s), {stopped} stopped on eos; KV cache {:.1} MiB",
            prompts.len(),
            cache_bytes as f64 / (1 << 20) as f64
        ));
        Ok(())
    }
}

/// An image as the dataset names it (MMIU's task is the folder of its file path).
fn image_name(r: &ImageRef) -> String {
    match r {
        ImageRef::File { path } => path.clone(),
        other => other.describe(),
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
