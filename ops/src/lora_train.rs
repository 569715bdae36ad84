//! Op `lora-train`: LoRA SFT of the model on the batch stream, as TRL's SFTTrainer with a PEFT
//! `LoraConfig` (parameter names are theirs). Output: the `adapter` artifact — the PEFT adapter
//! files, `metrics.jsonl`, `trainer_state.json` and the TensorBoard run under `runs/`.
//! Checkpoints go to `checkpoint_dir` (default `<output_dir>-checkpoints` beside the recipe's
//! output folder), never into the artifact.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::dist::Shard;
use crate::gpu::{Gpu, MatmulPrecision};
use crate::model::config::{FloatDtype, ModelConfig};
use crate::model::gpu::model::{Gemma3Gpu, Gemma3GpuOptions};
use crate::model::memory::{
    ActivationPlan, BaseFormat, DeviceLimits, LoraPlan, MemoryPlan, PlanOptions,
};
use crate::model::reference::lora::Adapter;
use crate::model::Weights;
use crate::params::OpParams;
use crate::train::lora_init::{load_adapter, new_adapter, LoraOptions, TargetSpec};
use crate::train::model::TrainModel;
use crate::train::optimizer::{AdamWConfig, Optim};
use crate::train::schedule::ScheduleKind;
use crate::train::tensorboard::{default_run_dir, hostname};
use crate::train::trainer::{
    train_with_optim, LossNormalizationKind, Resume, SaveStrategy, StreamSource, TrainConfig,
    TrainOutputs,
};
use crate::{op_params, ArtifactType, Device, Op, ParamError, ParamSpec, Port, RunCtx};

pub use crate::params::OneOrMany;

/// `resume_from_checkpoint`: true (the newest checkpoint), false, or a checkpoint folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BoolOrPath {
    Bool(bool),
    Path(String),
}

op_params! {
    pub struct LoraTrainParams {
        /// LoRA rank (PEFT `r`).
        r: usize = 8,
        /// LoRA scaling numerator: scaling = lora_alpha / r (or / sqrt(r) with use_rslora).
        lora_alpha: f64 = 8.0,
        /// Dropout on the LoRA input while training (seeded).
        lora_dropout: f64 = 0.0,
        /// "all-linear" (every Linear but lm_head, vision tower included, as PEFT), a list of module names (suffixes), or a regex string matched against the whole module name.
        target_modules: OneOrMany<String> = OneOrMany::One("all-linear".to_string()),
        /// Modules trained in full and saved whole: "lm_head", "embed_tokens" (two untied copies, as PEFT).
        modules_to_save: Vec<String> = Vec::new(),
        /// rsLoRA scaling lora_alpha / sqrt(r).
        use_rslora: bool = false,
        /// Only "none" (no bias is trained).
        bias: String = "none".to_string(),
        /// A PEFT adapter folder to start from instead of a fresh init (its adapter_config.json sets r, lora_alpha, target_modules, modules_to_save).
        init_adapter: Option<String> = None,
        /// Peak learning rate (SFTConfig default 2e-5).
        learning_rate: f64 = 2e-5,
        /// "linear", "cosine", "constant" or "constant_with_warmup" (transformers get_scheduler).
        lr_scheduler_type: String = "linear".to_string(),
        /// Warmup steps (>= 1), or a fraction of the run when below 1 (transformers 5).
        warmup_steps: f64 = 0.0,
        /// Warmup as a fraction of the run, ceil(total * ratio) (transformers 4); used when warmup_steps is 0.
        warmup_ratio: f64 = 0.0,
        /// AdamW decoupled weight decay.
        weight_decay: f64 = 0.0,
        adam_beta1: f64 = 0.9,
        adam_beta2: f64 = 0.999,
        adam_epsilon: f64 = 1e-8,
        /// "adamw_torch" (every AdamW state on the device; "adamw_torch_fused", the guide's, runs the same update) or "adamw_offload" (the AdamW states of the modules_to_save copies and their update on the host: the device holds only their values and gradients).
        optim: String = "adamw_torch".to_string(),
        /// Global L2 gradient-norm clipping; 0 turns clipping off (the norm is still logged).
        max_grad_norm: f64 = 1.0,
        /// Micro-batches per optimizer step (the batch size is collate's batch_size).
        gradient_accumulation_steps: usize = 1,
        num_train_epochs: f64 = 3.0,
        /// A positive value overrides num_train_epochs.
        max_steps: i64 = -1,
        /// Seeds the LoRA init and dropout; unset = the recipe's seed.
        seed: Option<u64> = None,
        /// Recompute each layer's activations in the backward instead of keeping them.
        gradient_checkpointing: bool = false,
        /// TRL's flag: the vocabulary tables in bf16 storage — the modules_to_save copies with their gradients and AdamW moments (as torch holds a bf16 model's copies: update in f32, stored rounded), the frozen embedding — and the scaled embeddings rounded to bf16. LoRA pairs, activations and the loss stay f32. The saved copies are bf16.
        bf16: bool = false,
        /// Operand precision of the frozen base's linear layers: "f32", or "f16" (every operand rounded to f16, f32 accumulation; adapters with SHADER_F16). LoRA pairs, norms, attention, the residual stream and the loss stay f32.
        matmul_precision: String = "f32".to_string(),
        /// "token_mean" (loss over the label tokens of the whole accumulated batch, transformers 5.24) or "micro_batch_mean" (mean of micro-batch means, the guide-era stack).
        loss_normalization: String = "token_mean".to_string(),
        /// Log loss, grad_norm, learning_rate, mean_token_accuracy, num_tokens, epoch every this many steps.
        logging_steps: u64 = 10,
        /// "tensorboard" (or ["tensorboard"]) writes runs/<date>_<host>/events.out.tfevents.*; "none" does not.
        report_to: OneOrMany<String> = OneOrMany::One("tensorboard".to_string()),
        /// "steps" (every save_steps and at the end), "epoch" or "no".
        save_strategy: String = "steps".to_string(),
        save_steps: u64 = 500,
        /// Keep at most this many checkpoints (the oldest are deleted).
        save_total_limit: Option<usize> = None,
        /// true: continue from the newest checkpoint in checkpoint_dir; or the path of a checkpoint folder.
        resume_from_checkpoint: BoolOrPath = BoolOrPath::Bool(false),
        /// Where checkpoint-<step> folders go; default: `<output_dir>-checkpoints` beside the recipe's output_dir.
        checkpoint_dir: Option<String> = None,
        /// Device memory the run may use, in GiB (wgpu cannot query it): the op prints its memory plan and refuses to start when the plan exceeds this. Unset: only the adapter's buffer limits are checked.
        device_memory_gib: Option<f64> = None,
    }
}

/// What [`build_model`] needs besides the weights and the adapter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelOptions {
    pub gradient_checkpointing: bool,
    pub matmul_precision: MatmulPrecision,
    /// The `bf16` param ([`Gemma3GpuOptions::bf16`]).
    pub bf16: bool,
}

/// Builds the trainable model from the frozen weights and the initial adapter.
pub type ModelBuilder =
    fn(&Gpu, &ModelConfig, &Weights, &Adapter, &ModelOptions) -> Result<Box<dyn TrainModel>>;

/// The model the op trains: [`Gemma3Gpu`], the forward and backward on the GPU kernels, with the
/// adapter's LoRA pairs and modules_to_save copies attached. (Tests swap in other builders through
/// [`LoraTrainOp::build`], e.g. the CPU reference behind GPU parameter buffers.)
pub fn build_model(
    gpu: &Gpu,
    config: &ModelConfig,
    weights: &Weights,
    adapter: &Adapter,
    opts: &ModelOptions,
) -> Result<Box<dyn TrainModel>> {
    Ok(Box::new(Gemma3Gpu::from_weights(
        gpu,
        config,
        weights,
        Some(adapter),
        Gemma3GpuOptions {
            gradient_checkpointing: opts.gradient_checkpointing,
            lora: Some(adapter.settings),
            matmul_precision: opts.matmul_precision,
            bf16: opts.bf16,
        },
    )?))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// What the GPU model will hold: NF4 linears as stored (absmax widened to f32) or dense ones in
/// f32, every other tensor in f32 (the kernels compute in f32), the LoRA pairs and
/// modules_to_save copies with gradients and AdamW moments in f32, and the activations of one
/// micro-batch: `batch_size` examples as long as the longest and with as many images as the
/// one with the most (an upper bound: the plan refuses a run before it starts, not midway).
fn memory_plan(
    config: &ModelConfig,
    weights: &Weights,
    adapter: &Adapter,
    data: &StreamSource,
    p: &LoraTrainParams,
    max_binding_bytes: u64,
    staged_operands: bool,
) -> Result<MemoryPlan> {
    let nf4 = crate::model::names::expected_tensors(config)
        .iter()
        .any(|e| weights.is_nf4(&e.name));
    let d = &data.descriptor;
    let seq_len = d.max_tokens.max(1);
    let mut modules_to_save = Vec::new();
    if adapter.lm_head.is_some() {
        modules_to_save.push("lm_head".to_string());
    }
    if adapter.embed_tokens.is_some() {
        modules_to_save.push("embed_tokens".to_string());
    }
    MemoryPlan::build(
        config,
        &plan_options(
            nf4,
            LoraPlan {
                r: adapter.pairs.values().map(|p| p.rank).max().unwrap_or(p.r),
                modules_to_save,
                modules_to_save_dtype: if p.bf16 {
                    FloatDtype::BF16
                } else {
                    FloatDtype::F32
                },
                vision: adapter.pairs.keys().any(|m| m.contains("vision_tower")),
                dropout: adapter.settings.dropout > 0.0,
                optimizer_offload: Optim::parse(&p.optim) == Ok(Optim::AdamWOffload),
            },
            ActivationPlan {
                batch: d.batch_size,
                seq_len,
                images_per_sample: d.max_images,
                gradient_checkpointing: p.gradient_checkpointing,
                activation_dtype: FloatDtype::F32,
                max_binding_bytes,
                staged_operands,
            },
        ),
    )
}

/// The plan options of a lora-train run (what `Gemma3Gpu` holds: NF4 linears as stored with
/// the absmax widened to f32, or dense f32 ones; every other tensor in f32, since the kernels
/// compute in f32) for a LoRA setup and a micro-batch shape. The `memory_plan` example plans
/// the guide's recipes with it.
pub fn plan_options(nf4: bool, lora: LoraPlan, activations: ActivationPlan) -> PlanOptions {
    PlanOptions {
        base: if nf4 {
            BaseFormat::Nf4 {
                double_quant: false,
            }
        } else {
            BaseFormat::Dense(FloatDtype::F32)
        },
        base_dtype: FloatDtype::F32,
        lora: Some(lora),
        activations: Some(activations),
    }
}

pub struct LoraTrainOp {
    pub build: ModelBuilder,
}

impl Default for LoraTrainOp {
    fn default() -> Self {
        Self { build: build_model }
    }
}

fn param_error(key: &str, message: String) -> ParamError {
    ParamError {
        key: Some(key.into()),
        message,
    }
}

/// Everything the params say, checked.
struct Plan {
    lora: Option<LoraOptionsNoSeed>,
    train: TrainConfig,
    optim: Optim,
    tensorboard: bool,
}

struct LoraOptionsNoSeed {
    r: usize,
    lora_alpha: f64,
    lora_dropout: f64,
    target_modules: TargetSpec,
    modules_to_save: Vec<String>,
    use_rslora: bool,
}

/// Far past any useful rank (at most the smaller side of a Linear; Gemma 3's is 640 to 5376):
/// larger values would only abort on allocating the LoRA matrices.
const MAX_LORA_R: usize = 1 << 16;
/// Micro-batches per step beyond which the step counts overflow nothing useful.
const MAX_ACCUMULATION: usize = 1 << 20;

fn plan(p: &LoraTrainParams, recipe_seed: u64) -> Result<Plan, ParamError> {
    if p.bias != "none" {
        return Err(param_error(
            "bias",
            format!("bias = {:?} is not supported; only \"none\"", p.bias),
        ));
    }
    if !(1..=MAX_LORA_R).contains(&p.r) {
        return Err(param_error(
            "r",
            format!(
                "r must be between 1 and {MAX_LORA_R}, got {} (the guide uses 16)",
                p.r
            ),
        ));
    }
    let finite = |key: &str, v: f64, ok: bool, what: &str| {
        if v.is_finite() && ok {
            Ok(())
        } else {
            Err(param_error(key, format!("{key} must be {what}, got {v}")))
        }
    };
    finite("lora_alpha", p.lora_alpha, true, "a finite number")?;
    finite(
        "learning_rate",
        p.learning_rate,
        p.learning_rate > 0.0,
        "a positive finite number",
    )?;
    finite(
        "weight_decay",
        p.weight_decay,
        p.weight_decay >= 0.0,
        "a finite number of at least 0",
    )?;
    for (key, v) in [("adam_beta1", p.adam_beta1), ("adam_beta2", p.adam_beta2)] {
        finite(key, v, (0.0..1.0).contains(&v), "in [0, 1)")?;
    }
    finite(
        "adam_epsilon",
        p.adam_epsilon,
        p.adam_epsilon > 0.0,
        "a positive finite number",
    )?;
    finite(
        "max_grad_norm",
        p.max_grad_norm,
        p.max_grad_norm >= 0.0,
        "a finite number of at least 0 (0 turns clipping off)",
    )?;
    finite(
        "num_train_epochs",
        p.num_train_epochs,
        p.num_train_epochs <= 1e6,
        "a finite number of at most 1e6",
    )?;
    for (key, v) in [
        ("warmup_steps", p.warmup_steps),
        ("warmup_ratio", p.warmup_ratio),
    ] {
        finite(key, v, v >= 0.0, "a finite number of at least 0")?;
    }
    if let Some(gib) = p.device_memory_gib {
        finite(
            "device_memory_gib",
            gib,
            gib > 0.0,
            "a positive finite number",
        )?;
    }
    if p.gradient_accumulation_steps > MAX_ACCUMULATION {
        return Err(param_error(
            "gradient_accumulation_steps",
            format!(
                "gradient_accumulation_steps must be at most {MAX_ACCUMULATION}, got {}",
                p.gradient_accumulation_steps
            ),
        ));
    }
    if !(0.0..1.0).contains(&p.lora_dropout) {
        return Err(param_error(
            "lora_dropout",
            format!("lora_dropout must be in [0, 1), got {}", p.lora_dropout),
        ));
    }
    if p.learning_rate.is_nan() || p.learning_rate <= 0.0 {
        return Err(param_error(
            "learning_rate",
            "learning_rate must be positive".into(),
        ));
    }
    for m in &p.modules_to_save {
        if m != "lm_head" && m != "embed_tokens" {
            return Err(param_error(
                "modules_to_save",
                format!("modules_to_save entry {m:?} is not supported; use \"lm_head\" and/or \"embed_tokens\""),
            ));
        }
    }
    let optim = Optim::parse(&p.optim).map_err(|e| param_error("optim", e))?;
    MatmulPrecision::parse(&p.matmul_precision)
        .map_err(|e| param_error("matmul_precision", format!("matmul_precision: {e}")))?;
    let lr_scheduler_type = ScheduleKind::parse(&p.lr_scheduler_type)
        .map_err(|e| param_error("lr_scheduler_type", format!("{e:#}")))?;
    crate::train::schedule::warmup_steps(1, p.warmup_steps, p.warmup_ratio)
        .map_err(|e| param_error("warmup_steps", format!("{e:#}")))?;
    if p.gradient_accumulation_steps == 0 {
        return Err(param_error(
            "gradient_accumulation_steps",
            "gradient_accumulation_steps must be at least 1".into(),
        ));
    }
    if p.logging_steps == 0 {
        return Err(param_error(
            "logging_steps",
            "logging_steps must be at least 1".into(),
        ));
    }
    if p.max_steps <= 0 && (p.num_train_epochs.is_nan() || p.num_train_epochs <= 0.0) {
        return Err(param_error(
            "num_train_epochs",
            "num_train_epochs must be positive (or set max_steps)".into(),
        ));
    }
    let save_strategy = match p.save_strategy.as_str() {
        "no" => SaveStrategy::No,
        "epoch" => SaveStrategy::Epoch,
        "steps" if p.save_steps > 0 => SaveStrategy::Steps(p.save_steps),
        "steps" => {
            return Err(param_error(
                "save_steps",
                "save_steps must be at least 1".into(),
            ))
        }
        other => {
            return Err(param_error(
                "save_strategy",
                format!("save_strategy must be \"steps\", \"epoch\" or \"no\", got {other:?}"),
            ))
        }
    };
    let loss_normalization = match p.loss_normalization.as_str() {
        "token_mean" => LossNormalizationKind::TokenMean,
        "micro_batch_mean" => LossNormalizationKind::MicroBatchMean,
        other => {
            return Err(param_error(
                "loss_normalization",
                format!(
                "loss_normalization must be \"token_mean\" or \"micro_batch_mean\", got {other:?}"
            ),
            ))
        }
    };
    let reports = p.report_to.to_vec();
    let mut tensorboard = false;
    for r in &reports {
        match r.as_str() {
            "tensorboard" => tensorboard = true,
            "none" => {}
            other => {
                return Err(param_error(
                    "report_to",
                    format!(
                        "report_to {other:?} is not supported; use \"tensorboard\" or \"none\""
                    ),
                ))
            }
        }
    }
    let target_modules = match &p.target_modules {
        OneOrMany::One(s) if s == "all-linear" => TargetSpec::AllLinear,
        OneOrMany::One(re) => {
            regex::Regex::new(re).map_err(|e| {
                param_error(
                    "target_modules",
                    format!(
                        "target_modules {re:?} is neither \"all-linear\" nor a valid regex: {e}"
                    ),
                )
            })?;
            TargetSpec::Regex(re.clone())
        }
        OneOrMany::Many(v) if v.is_empty() => {
            return Err(param_error(
                "target_modules",
                "target_modules is an empty list".into(),
            ))
        }
        OneOrMany::Many(v) => TargetSpec::Names(v.clone()),
    };
    Ok(Plan {
        lora: p.init_adapter.is_none().then(|| LoraOptionsNoSeed {
            r: p.r,
            lora_alpha: p.lora_alpha,
            lora_dropout: p.lora_dropout,
            target_modules,
            modules_to_save: p.modules_to_save.clone(),
            use_rslora: p.use_rslora,
        }),
        train: TrainConfig {
            learning_rate: p.learning_rate,
            lr_scheduler_type,
            warmup_steps: p.warmup_steps,
            warmup_ratio: p.warmup_ratio,
            adamw: AdamWConfig {
                beta1: p.adam_beta1,
                beta2: p.adam_beta2,
                eps: p.adam_epsilon,
                weight_decay: p.weight_decay,
            },
            max_grad_norm: p.max_grad_norm,
            gradient_accumulation_steps: p.gradient_accumulation_steps,
            num_train_epochs: p.num_train_epochs,
            max_steps: (p.max_steps > 0).then_some(p.max_steps as u64),
            logging_steps: p.logging_steps,
            save_strategy,
            save_total_limit: p.save_total_limit,
            loss_normalization,
            seed: p.seed.unwrap_or(recipe_seed),
        },
        tensorboard,
        optim,
    })
}

/// Creates `dir` if needed and proves a file can be created in it.
fn check_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    tempfile::tempfile_in(dir)?;
    Ok(())
}

/// `<output_dir>-checkpoints`, beside the recipe's output folder (never inside it).
pub fn default_checkpoint_dir(output_dir: &Path) -> PathBuf {
    let name = output_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    output_dir.with_file_name(format!("{name}-checkpoints"))
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
        let seed = plan.train.seed;
        let checkpoint_dir = match &p.checkpoint_dir {
            Some(d) => ctx.recipe.resolve(d),
            None => default_checkpoint_dir(&ctx.recipe.output_dir),
        };
        let resumes = !matches!(p.resume_from_checkpoint, BoolOrPath::Bool(false));
        let world = crate::dist::world();
        // Rank 0 alone writes checkpoints and reads the one it resumes from.
        if world.is_main() && (plan.train.save_strategy != SaveStrategy::No || resumes) {
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
        let (mut adapter_config, adapter) = match (&p.init_adapter, &plan.lora) {
            (Some(path), _) => {
                let dir = ctx.recipe.resolve(path);
                ctx.progress.println(format!(
                    "op `{}`: starting from the adapter {} (its adapter_config.json sets r, lora_alpha, target_modules, modules_to_save)",
                    ctx.name,
                    dir.display()
                ));
                load_adapter(&dir, &config, seed)
                    .with_context(|| format!("init_adapter {}", dir.display()))?
            }
            (None, Some(l)) => new_adapter(
                &config,
                &weights,
                &LoraOptions {
                    r: l.r,
                    lora_alpha: l.lora_alpha,
                    lora_dropout: l.lora_dropout,
                    target_modules: l.target_modules.clone(),
                    modules_to_save: l.modules_to_save.clone(),
                    use_rslora: l.use_rslora,
                    seed,
                },
            )?,
            (None, None) => unreachable!("plan keeps the LoRA options without init_adapter"),
        };
        adapter_config.base_model_name_or_path = Some(
            manifest
                .get("repo_id")
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| root.display().to_string()),
        );
        adapter_config.inference_mode = true;

        // Under several ranks this rank trains on every world_size-th micro-batch.
        let data = StreamSource::open_shard(
            &ctx.input("batches")?.dir,
            Shard {
                rank: world.rank,
                world: world.size,
            },
        )?;
        let gpu = Gpu::get()?;
        // Before any weight is uploaded: a run whose activations cannot be bound fails here, not
        // minutes into loading.
        let memory = memory_plan(
            &config,
            &weights,
            &adapter,
            &data,
            &p,
            gpu.max_binding_bytes(),
            gpu.stages_operands(),
        )?;
        ctx.progress.println(format!(
            "op `{}`: device memory plan: {:.1} MiB (weights {:.1}, trainable {:.1}, activations {:.1}, staging {:.1})",
            ctx.name,
            mib(memory.device_total()),
            mib(memory.device_part_total("weights")),
            mib(memory.device_part_total("trainable")),
            mib(memory.device_part_total("activations")),
            mib(memory.device_part_total("staging")),
        ));
        let limits = gpu.limits();
        memory
            .check(&DeviceLimits {
                max_buffer_size: limits.max_buffer_size,
                // The engine's binding (RUNNER_GPU_MAX_BINDING may lower the adapter's).
                max_storage_buffer_binding_size: gpu.max_binding_bytes(),
                memory_budget: p
                    .device_memory_gib
                    .map(|g| (g * (1u64 << 30) as f64) as u64),
            })
            .with_context(|| {
                format!("op `{}`: the model does not fit the GPU adapter", ctx.name)
            })?;
        gpu.reserve_staging(memory.staging_reserve_bytes(gpu.max_binding_bytes()));
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
        let resume = match &p.resume_from_checkpoint {
            BoolOrPath::Bool(false) => Resume::No,
            BoolOrPath::Bool(true) => Resume::Latest,
            BoolOrPath::Path(path) => Resume::Path(ctx.recipe.resolve(path)),
        };
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
