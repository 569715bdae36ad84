//! Op `eval`: the model (with an optional trained adapter) on a batch stream, without dropout:
//! the token-mean loss and accuracy of the split, and the logits of the first batches with the
//! inputs that produced them — what `tools/peft_compat/check.py` replays in PEFT to prove the
//! saved adapter means the same thing there.
//!
//! Output: `eval.json` (`loss`, `num_tokens`, `mean_token_accuracy`, `batches`, `examples`) and,
//! when `logits_batches > 0`, `logits.safetensors` with `batch.<i>.{logits [B,T,V] F32,
//! input_ids, attention_mask, token_type_ids, labels [B,T] I64, pixel_values [N,3,H,W] F32}`.

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use serde_json::json;

use crate::data::collate::{BatchStream, StreamOptions};
use crate::gpu::MatmulPrecision;
use crate::model::gpu::model::Gemma3Gpu;
use crate::model::reference::loss::shift_labels;
use crate::model::ModelConfig;
use crate::params::OpParams;
use crate::reference::cross_entropy::IGNORE_INDEX;
use crate::train::adapter::HostTensor;
use crate::{op_params, ArtifactType, Device, Op, ParamSpec, Port, RunCtx};

/// The op's summary file.
pub const EVAL_JSON: &str = "eval.json";
/// The recorded logits and inputs.
pub const LOGITS_FILE: &str = "logits.safetensors";

op_params! {
    pub struct EvalParams {
        /// Evaluate at most this many batches of the stream (one epoch, in its order); unset: all.
        max_batches: Option<usize> = None,
        /// Write the logits and inputs of the first N batches to logits.safetensors (they are [batch, seq, vocab] f32: keep N small for real vocabularies).
        logits_batches: usize = 0,
        /// Operand precision of the frozen base's linear layers: "f32" or "f16" (as lora-train's).
        matmul_precision: String = "f32".to_string(),
        /// The vocabulary tables (the adapter's modules_to_save copies, the frozen embedding) in bf16, as lora-train's `bf16`.
        bf16: bool = false,
    }
}

pub struct EvalOp;

impl Op for EvalOp {
    fn kind(&self) -> &'static str {
        "eval"
    }
    fn doc(&self) -> &'static str {
        "Loss, token accuracy and (optionally) logits of the model + adapter on a batch stream (no dropout)"
    }
    fn inputs(&self) -> Vec<Port> {
        vec![
            Port {
                name: "model",
                accepts: &[ArtifactType::Model, ArtifactType::QuantizedModel],
                required: true,
                doc: "the base model (dense or NF4)",
            },
            Port {
                name: "batches",
                accepts: &[ArtifactType::Batches],
                required: true,
                doc: "the batches to evaluate (collate)",
            },
            Port {
                name: "adapter",
                accepts: &[ArtifactType::Adapter],
                required: false,
                doc: "a trained adapter (lora-train); unset evaluates the base model",
            },
        ]
    }
    fn params(&self) -> Vec<ParamSpec> {
        EvalParams::specs()
    }
    fn version(&self) -> u32 {
        1
    }
    fn device(&self) -> Device {
        Device::Gpu
    }
    fn check(&self, params: &toml::Table) -> Result<toml::Table, crate::ParamError> {
        let p = EvalParams::from_table(params)?;
        MatmulPrecision::parse(&p.matmul_precision).map_err(|e| crate::ParamError {
            key: Some("matmul_precision".into()),
            message: format!("matmul_precision: {e}"),
        })?;
        EvalParams::canonical(params)
    }
    fn output(&self, _params: &toml::Table) -> ArtifactType {
        ArtifactType::Evaluation
    }
    fn run(&self, ctx: &RunCtx) -> Result<()> {
        let params = EvalParams::from_table(ctx.params)?;
        let (root, _) = crate::model::artifact_model_root(&ctx.input("model")?.dir)?;
        let config = ModelConfig::from_file(&root.join("config.json"))?;
        let adapter = ctx.optional_input("adapter");
        let gpu = crate::gpu::Gpu::get()?;
        let model = Gemma3Gpu::for_inference(
            gpu,
            &root,
            &config,
            adapter.map(|a| a.dir.as_path()),
            MatmulPrecision::parse(&params.matmul_precision)?,
            params.bf16,
        )
        .with_context(|| format!("op `{}`", ctx.name))?;
        let stream = BatchStream::open(
            &ctx.input("batches")?.dir,
            StreamOptions {
                epochs: 1,
                ..Default::default()
            },
        )?;
        let total = stream.remaining();
        let limit = params.max_batches.unwrap_or(total).min(total);
        ctx.progress.set_length(limit as u64);
        let mut summary = EvalSummary::default();
        let mut recorded: BTreeMap<String, HostTensor> = BTreeMap::new();
        for (i, batch) in stream.take(limit).enumerate() {
            let batch = batch?;
            let logits = model.logits(gpu, &batch)?;
            summary.add(&batch, &logits, config.text().vocab_size)?;
            if i < params.logits_batches {
                record(&mut recorded, i, &batch, logits, config.text().vocab_size);
            }
            ctx.progress.inc(1);
        }
        ensure!(
            summary.tokens > 0,
            "op `{}`: the batches hold no label tokens to evaluate",
            ctx.name
        );
        if !recorded.is_empty() {
            safetensors::serialize_to_file(&recorded, None, &ctx.out_dir.join(LOGITS_FILE))
                .context("writing logits.safetensors")?;
        }
        let loss = summary.loss_sum / summary.tokens as f64;
        let accuracy = summary.correct as f64 / summary.tokens as f64;
        let out = json!({
            "loss": loss,
            "num_tokens": summary.tokens,
            "mean_token_accuracy": accuracy,
            "batches": summary.batches,
            "examples": summary.examples,
            "adapter": adapter.is_some(),
        });
        std::fs::write(
            ctx.out_dir.join(EVAL_JSON),
            serde_json::to_string_pretty(&out)?,
        )?;
        ctx.progress.println(format!(
            "op `{}`: loss {loss:.4}, token accuracy {accuracy:.4} over {} tokens in {} batches",
            ctx.name, summary.tokens, summary.batches
        ));
        Ok(())
    }
}

#[derive(Default)]
struct EvalSummary {
    loss_sum: f64,
    tokens: u64,
    correct: u64,
    batches: usize,
    examples: usize,
}

impl EvalSummary {
    /// Adds a batch's causal-LM cross-entropy (shifted labels, as the training loss) in f64.
    fn add(
        &mut self,
        batch: &crate::data::collate::Batch,
        logits: &[f32],
        vocab: usize,
    ) -> Result<()> {
        let (b, t) = (batch.batch_size, batch.seq_len);
        ensure!(
            logits.len() == b * t * vocab,
            "logits hold {} values, expected {b}×{t}×{vocab}",
            logits.len()
        );
        let mask: Vec<u32> = batch.attention_mask.iter().map(|&m| m as u32).collect();
        let shifted = shift_labels(&batch.labels, &mask, b, t, false);
        for (row, &label) in shifted.iter().enumerate() {
            if label == IGNORE_INDEX {
                continue;
            }
            let z = &logits[row * vocab..(row + 1) * vocab];
            let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let lse = max + z.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            self.loss_sum += lse - z[label as usize] as f64;
            // argmax with the lowest index on ties, as the training metric.
            let argmax = z
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                    if v > bv {
                        (i, v)
                    } else {
                        (bi, bv)
                    }
                })
                .0;
            self.correct += (argmax == label as usize) as u64;
            self.tokens += 1;
        }
        self.batches += 1;
        self.examples += b;
        Ok(())
    }
}

fn record(
    out: &mut BTreeMap<String, HostTensor>,
    i: usize,
    batch: &crate::data::collate::Batch,
    logits: Vec<f32>,
    vocab: usize,
) {
    let (b, t) = (batch.batch_size, batch.seq_len);
    let p = format!("batch.{i}.");
    out.insert(
        format!("{p}logits"),
        HostTensor::from_f32(vec![b, t, vocab], &logits),
    );
    for (name, v) in [
        ("input_ids", &batch.input_ids),
        ("attention_mask", &batch.attention_mask),
        ("token_type_ids", &batch.token_type_ids),
        ("labels", &batch.labels),
    ] {
        out.insert(format!("{p}{name}"), HostTensor::from_i64(vec![b, t], v));
    }
    if batch.num_images > 0 {
        out.insert(
            format!("{p}pixel_values"),
            HostTensor::from_f32(
                vec![batch.num_images, 3, batch.image_height, batch.image_width],
                &batch.pixel_values,
            ),
        );
    }
}
