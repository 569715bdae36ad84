//! Op `lora-train`: LoRA SFT of the model on the batch stream, as TRL's SFTTrainer with a PEFT
//! `LoraConfig` (parameter names are theirs). Output: the `adapter` artifact — the PEFT adapter
//! files, `metrics.jsonl`, `trainer_state.json` and the TensorBoard run under `runs/`.
//! Checkpoints go to `checkpoint_dir` (default `<output_dir>-checkpoints` beside the recipe's
//! output folder), never into the artifact. The params and their check are
//! `train::params`; what the run builds before its loop is `train::setup`.

use anyhow::{Context, Result};

use crate::dist::Shard;
use crate::gpu::{Gpu, MatmulPrecision};
use crate::model::config::ModelConfig;
use crate::model::Weights;
use crate::params::OpParams;
use crate::train::params::{plan, LoraTrainParams};
use crate::train::setup::{
    build_model, check_writable, default_checkpoint_dir, fit_to_device, initial_adapter,
    ModelBuilder, ModelOptions,
};
use crate::train::sources::StreamSource;
use crate::train::tensorboard::{default_run_dir, hostname};
use crate::train::train_config::{Resume, SaveStrategy};
use crate::train::trainer::{train_with_optim, TrainOutputs};
use crate::{ArtifactType, Device, Op, ParamError, ParamSpec, Port, RunCtx};

pub struct LoraTrainOp {
    pub build: ModelBuilder,
}

impl Default for LoraTrainOp {
    fn default() -> Self {
        Self { build: build_model }
    }
}

impl Op for LoraTrainOp {
    fn kind(&self) -> &'static str {
        "lora-train"
    }
    fn doc(&self) -> &'static str {
        "LoRA SFT (TRL SFTTrainer + PEFT semantics): trains an adapter on the batch stream; writes the PEFT adapter, metrics.jsonl and TensorBoard logs"
    }
    fn inputs(&self) -> Vec<Port> {
        vec![
            Port {
                name: "model",
                accepts: &[ArtifactType::Model, ArtifactType::QuantizedModel],
                required: true,
                doc: "the frozen base model (bf16/f32, or NF4 for QLoRA)",
            },
            Port {
                name: "batches",
                accepts: &[ArtifactType::Batches],
                required: true,
                doc: "the training batches (collate)",
            },
        ]
    }
    fn params(&self) -> Vec<ParamSpec> {
        LoraTrainParams::specs()
    }
    fn version(&self) -> u32 {
        1
    }
    fn fingerprint(
        &self,
        params: &toml::Table,
        recipe: &crate::RecipeInfo,
    ) -> anyhow::Result<Option<String>> {
        // Without its own `seed` the op takes the recipe's, which is not among its params.
        let p = LoraTrainParams::from_table(params)?;
        Ok(p.seed
            .is_none()
            .then(|| format!("recipe seed {}", recipe.seed)))
    }
    fn device(&self) -> Device {
        Device::Gpu
    }
    fn collective(&self) -> bool {
        true
    }
    fn check(&self, params: &toml::Table) -> Result<toml::Table, ParamError> {
        let p = LoraTrainParams::from_table(params)?;
        plan(&p, 0)?;
        LoraTrainParams::canonical(params)
    }
    fn output(&self, _params: &toml::Table) -> ArtifactType {
        ArtifactType::Adapter
    }
    fn run(&self, ctx: &RunCtx) -> Result<()> {
        let p = LoraTrainParams::from_table(ctx.params)?;
        let plan = plan(&p, ctx.recipe.seed)?;
        let checkpoint_dir = match &p.checkpoint_dir {
            Some(d) => ctx.recipe.resolve(d),
            None => default_checkpoint_dir(&ctx.recipe.output_dir),
        };
        let resume = p
            .resume_from_checkpoint
            .resume(|path| ctx.recipe.resolve(path));
        let world = crate::dist::world();
        // Rank 0 alone writes checkpoints and reads the one it resumes from.
        if world.is_main()
            && (plan.train.save_strategy != SaveStrategy::No || !matches!(resume, Resume::No))
        {
            // Found now, not after an hour of training when the first checkpoint is written.
            check_writable(&checkpoint_dir).with_context(|| {
                format!(
                    "op `{}`: checkpoint_dir {} is not writable; set `checkpoint_dir` to a folder you can write, or save_strategy = \"no\"",
                    ctx.name,
                    checkpoint_dir.display()
                )
            })?;
        }
        let model_artifact = ctx.input("model")?;
        let (root, manifest) = crate::model::artifact_model_root(&model_artifact.dir)?;
        let config = ModelConfig::from_file(&root.join("config.json"))?;
        let weights = Weights::open(&root, &config)?;
        let init_adapter = p.init_adapter.as_deref().map(|d| ctx.recipe.resolve(d));
        if let Some(dir) = &init_adapter {
            ctx.progress.println(format!(
                "op `{}`: starting from the adapter {} (its adapter_config.json sets r, lora_alpha, target_modules, modules_to_save)",
                ctx.name,
                dir.display()
            ));
        }
        let base_model = manifest
            .get("repo_id")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| root.display().to_string());
        let (adapter_config, adapter) = initial_adapter(
            &plan,
            init_adapter.as_deref(),
            &config,
            &weights,
            base_model,
        )?;

        // Under several ranks this rank trains on every world_size-th micro-batch.
        let data = StreamSource::open_shard(
            &ctx.input("batches")?.dir,
            Shard {
                rank: world.rank,
                world: world.size,
            },
        )?;
        let gpu = Gpu::get()?;
        let memory = fit_to_device(gpu, &config, &weights, &adapter, &data, &p)
            .with_context(|| format!("op `{}`", ctx.name))?;
        ctx.progress.println(format!("op `{}`: {memory}", ctx.name));
        let mut model = (self.build)(
            gpu,
            &config,
            &weights,
            &adapter,
            &ModelOptions {
                gradient_checkpointing: p.gradient_checkpointing,
                matmul_precision: MatmulPrecision::parse(&p.matmul_precision)?,
                bf16: p.bf16,
            },
        )?;
        let tensorboard_dir = plan.tensorboard.then(|| {
            use chrono::{Datelike, Timelike};
            let now = chrono::Local::now();
            ctx.out_dir.join(default_run_dir(
                (
                    now.month(),
                    now.day(),
                    now.hour(),
                    now.minute(),
                    now.second(),
                ),
                &hostname(),
            ))
        });
        let summary = train_with_optim(
            gpu,
            model.as_mut(),
            &data,
            &plan.train,
            plan.optim,
            &adapter_config,
            &TrainOutputs {
                out_dir: ctx.out_dir.to_path_buf(),
                tensorboard_dir,
                checkpoint_dir,
            },
            &resume,
            ctx.progress,
        )?;
        ctx.progress.println(format!(
            "op `{}`: {} steps ({:.2} epochs) in {:.1} s, train_loss {:.4}",
            ctx.name, summary.global_step, summary.epoch, summary.seconds, summary.train_loss
        ));
        if summary.world_size > 1 {
            let steps = summary.steps_run.max(1);
            ctx.progress.println(format!(
                "op `{}`: {} ranks, global batch {} x {} x {}; all-reduce {} bytes per rank per step on average, {} at most",
                ctx.name,
                summary.world_size,
                data.descriptor.batch_size,
                summary.world_size,
                plan.train.gradient_accumulation_steps,
                summary.allreduce_bytes_total / steps,
                summary.allreduce_bytes_max
            ));
        }
        Ok(())
    }
}
