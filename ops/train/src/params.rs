//! The `lora-train` op's params, with TRL's `SFTConfig` and PEFT's `LoraConfig` names, and their
//! check ([`plan`]): everything a recipe sets for a training run, turned into the loop's
//! [`TrainConfig`], the new adapter's [`LoraOptions`] and the optimizer, or a [`ParamError`]
//! naming the param, before anything is loaded.

use engine::gpu::MatmulPrecision;
use op_api::params::OneOrMany;
use op_api::{op_params, ParamError};
use serde::{Deserialize, Serialize};

use crate::lora_init::{LoraOptions, TargetSpec};
use crate::optimizer::{AdamWConfig, Optim};
use crate::schedule::ScheduleKind;
use crate::train_config::{LossNormalizationKind, Resume, SaveStrategy, TrainConfig};

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

/// Everything the params say, checked.
#[derive(Debug, Clone)]
pub struct TrainPlan {
    /// A fresh adapter's settings; `None` with `init_adapter`, whose adapter_config.json sets them.
    pub lora: Option<LoraOptions>,
    pub train: TrainConfig,
    pub optim: Optim,
    /// `report_to` includes "tensorboard".
    pub tensorboard: bool,
}

/// Far past any useful rank (at most the smaller side of a Linear; Gemma 3's is 640 to 5376):
/// larger values would only abort on allocating the LoRA matrices.
const MAX_LORA_R: usize = 1 << 16;
/// Micro-batches per step beyond which the step counts overflow nothing useful.
const MAX_ACCUMULATION: usize = 1 << 20;

/// Checks the params; `recipe_seed` seeds the run when the op sets no `seed`.
pub fn plan(p: &LoraTrainParams, recipe_seed: u64) -> Result<TrainPlan, ParamError> {
    let seed = p.seed.unwrap_or(recipe_seed);
    if p.bias != "none" {
        return Err(ParamError::at(
            "bias",
            format!("bias = {:?} is not supported; only \"none\"", p.bias),
        ));
    }
    if !(1..=MAX_LORA_R).contains(&p.r) {
        return Err(ParamError::at(
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
            Err(ParamError::at(
                key,
                format!("{key} must be {what}, got {v}"),
            ))
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
        return Err(ParamError::at(
            "gradient_accumulation_steps",
            format!(
                "gradient_accumulation_steps must be at most {MAX_ACCUMULATION}, got {}",
                p.gradient_accumulation_steps
            ),
        ));
    }
    if !(0.0..1.0).contains(&p.lora_dropout) {
        return Err(ParamError::at(
            "lora_dropout",
            format!("lora_dropout must be in [0, 1), got {}", p.lora_dropout),
        ));
    }
    if p.learning_rate.is_nan() || p.learning_rate <= 0.0 {
        return Err(ParamError::at(
            "learning_rate",
            "learning_rate must be positive",
        ));
    }
    for m in &p.modules_to_save {
        if m != "lm_head" && m != "embed_tokens" {
            return Err(ParamError::at(
                "modules_to_save",
                format!("modules_to_save entry {m:?} is not supported; use \"lm_head\" and/or \"embed_tokens\""),
            ));
        }
    }
    let optim = Optim::parse(&p.optim).map_err(|e| ParamError::at("optim", e))?;
    MatmulPrecision::parse(&p.matmul_precision)
        .map_err(|e| ParamError::at("matmul_precision", format!("matmul_precision: {e}")))?;
    let lr_scheduler_type = ScheduleKind::parse(&p.lr_scheduler_type)
        .map_err(|e| ParamError::at("lr_scheduler_type", format!("{e:#}")))?;
    crate::schedule::warmup_steps(1, p.warmup_steps, p.warmup_ratio)
        .map_err(|e| ParamError::at("warmup_steps", format!("{e:#}")))?;
    if p.gradient_accumulation_steps == 0 {
        return Err(ParamError::at(
            "gradient_accumulation_steps",
            "gradient_accumulation_steps must be at least 1",
        ));
    }
    if p.logging_steps == 0 {
        return Err(ParamError::at(
            "logging_steps",
            "logging_steps must be at least 1",
        ));
    }
    if p.max_steps <= 0 && (p.num_train_epochs.is_nan() || p.num_train_epochs <= 0.0) {
        return Err(ParamError::at(
            "num_train_epochs",
            "num_train_epochs must be positive (or set max_steps)",
        ));
    }
    let save_strategy = match p.save_strategy.as_str() {
        "no" => SaveStrategy::No,
        "epoch" => SaveStrategy::Epoch,
        "steps" if p.save_steps > 0 => SaveStrategy::Steps(p.save_steps),
        "steps" => {
            return Err(ParamError::at(
                "save_steps",
                "save_steps must be at least 1",
            ))
        }
        other => {
            return Err(ParamError::at(
                "save_strategy",
                format!("save_strategy must be \"steps\", \"epoch\" or \"no\", got {other:?}"),
            ))
        }
    };
    let loss_normalization = match p.loss_normalization.as_str() {
        "token_mean" => LossNormalizationKind::TokenMean,
        "micro_batch_mean" => LossNormalizationKind::MicroBatchMean,
        other => {
            return Err(ParamError::at(
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
                return Err(ParamError::at(
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
                ParamError::at(
                    "target_modules",
                    format!(
                        "target_modules {re:?} is neither \"all-linear\" nor a valid regex: {e}"
                    ),
                )
            })?;
            TargetSpec::Regex(re.clone())
        }
        OneOrMany::Many(v) if v.is_empty() => {
            return Err(ParamError::at(
                "target_modules",
                "target_modules is an empty list",
            ))
        }
        OneOrMany::Many(v) => TargetSpec::Names(v.clone()),
    };
    Ok(TrainPlan {
        lora: p.init_adapter.is_none().then(|| LoraOptions {
            r: p.r,
            lora_alpha: p.lora_alpha,
            lora_dropout: p.lora_dropout,
            target_modules,
            modules_to_save: p.modules_to_save.clone(),
            use_rslora: p.use_rslora,
            seed,
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
            seed,
        },
        tensorboard,
        optim,
    })
}

impl BoolOrPath {
    /// Where training resumes from; `resolve` turns a recipe-relative path into a real one.
    pub fn resume(&self, resolve: impl Fn(&str) -> std::path::PathBuf) -> Resume {
        match self {
            BoolOrPath::Bool(false) => Resume::No,
            BoolOrPath::Bool(true) => Resume::Latest,
            BoolOrPath::Path(path) => Resume::Path(resolve(path)),
        }
    }
}
