//! What a training run is told (the config, where it writes, whether it resumes) and what it
//! reports (the summary, or the non-finite stop).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::metrics::LogRecord;
use super::optimizer::AdamWConfig;
use super::schedule::ScheduleKind;

/// How a micro-batch's summed cross-entropy is scaled (see
/// [`model::reference::loss::LossNormalization`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossNormalizationKind {
    /// Σ CE / label tokens of the whole accumulation cycle (transformers 5.24 + TRL 1.16). A
    /// cycle without label tokens divides by 1 (TRL clamps the count).
    TokenMean,
    /// Each micro-batch's token mean / the cycle's micro-batch count (the guide-era stack).
    MicroBatchMean,
}

/// `save_strategy` (+ `save_steps`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SaveStrategy {
    No,
    Epoch,
    Steps(u64),
}

/// Everything the loop needs to know (TrainingArguments names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub learning_rate: f64,
    pub lr_scheduler_type: ScheduleKind,
    pub warmup_steps: f64,
    pub warmup_ratio: f64,
    pub adamw: AdamWConfig,
    /// ≤ 0: no clipping (the norm is still computed and logged).
    pub max_grad_norm: f64,
    pub gradient_accumulation_steps: usize,
    pub num_train_epochs: f64,
    /// Overrides `num_train_epochs` when set.
    pub max_steps: Option<u64>,
    pub logging_steps: u64,
    pub save_strategy: SaveStrategy,
    pub save_total_limit: Option<usize>,
    pub loss_normalization: LossNormalizationKind,
    /// Dropout masks derive from it (the data order is fixed by the `batches` artifact).
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            learning_rate: 5e-5,
            lr_scheduler_type: ScheduleKind::Linear,
            warmup_steps: 0.0,
            warmup_ratio: 0.0,
            adamw: AdamWConfig::default(),
            max_grad_norm: 1.0,
            gradient_accumulation_steps: 1,
            num_train_epochs: 3.0,
            max_steps: None,
            logging_steps: 500,
            save_strategy: SaveStrategy::Steps(500),
            save_total_limit: None,
            loss_normalization: LossNormalizationKind::TokenMean,
            seed: 42,
        }
    }
}

/// Where the loop writes.
#[derive(Debug, Clone)]
pub struct TrainOutputs {
    /// The adapter, `metrics.jsonl` and `trainer_state.json` go here.
    pub out_dir: PathBuf,
    /// TensorBoard run folder (e.g. `out_dir/runs/<date>_<host>`), or none (`report_to = "none"`).
    pub tensorboard_dir: Option<PathBuf>,
    /// Where `checkpoint-<step>` folders go.
    pub checkpoint_dir: PathBuf,
}

/// `resume_from_checkpoint`.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    No,
    /// The newest checkpoint in the checkpoint folder (an error when there is none, as
    /// transformers).
    Latest,
    Path(PathBuf),
}

/// A non-finite loss or gradient norm stopped the run.
#[derive(Debug, thiserror::Error)]
#[error(
    "training stopped at step {step}: the {what} is not finite (loss {loss}, gradient norm {grad_norm}); {}",
    match last_checkpoint {
        Some(p) => format!("the last good checkpoint is {}", p.display()),
        None => "no checkpoint was written before it".to_string(),
    }
)]
pub struct NonFiniteError {
    pub step: u64,
    pub what: &'static str,
    pub loss: f64,
    pub grad_norm: f64,
    pub last_checkpoint: Option<PathBuf>,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub global_step: u64,
    pub total_steps: u64,
    pub epoch: f64,
    /// Mean step loss over the whole run (transformers' `train_loss`).
    pub train_loss: f64,
    pub records: Vec<LogRecord>,
    pub resumed_from: Option<PathBuf>,
    pub last_checkpoint: Option<PathBuf>,
    pub seconds: f64,
    /// Optimizer steps this call took (fewer than `global_step` after a resume).
    pub steps_run: u64,
    /// Data-parallel ranks (1: one process).
    pub world_size: usize,
    /// Bytes this rank gave to the gradient all-reduces, over the steps this run took, and the
    /// most in one step (0 in one process).
    pub allreduce_bytes_total: u64,
    pub allreduce_bytes_max: u64,
}
