//! What a `lora-train` run sets up before its loop: the starting adapter (fresh or from a folder),
//! the device memory plan checked against the adapter, and the trainable model on the GPU.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use engine::gpu::{Gpu, MatmulPrecision};
use model::config::{FloatDtype, ModelConfig};
use model::gpu::model::{Gemma3Gpu, Gemma3GpuOptions};
use model::memory::{ActivationPlan, BaseFormat, DeviceLimits, LoraPlan, MemoryPlan, PlanOptions};
use model::peft::AdapterConfig;
use model::reference::lora::Adapter;
use model::train_model::TrainModel;
use model::Weights;

use crate::lora_init::{load_adapter, new_adapter};
use crate::optimizer::Optim;
use crate::params::{LoraTrainParams, TrainPlan};
use crate::sources::StreamSource;

/// The adapter training starts from: `init_adapter`'s folder (its adapter_config.json sets r,
/// lora_alpha, target_modules and modules_to_save), else a fresh one as the params say. The
/// config names `base_model` (the Hub repo id, else the folder) as the adapter's base.
pub fn initial_adapter(
    plan: &TrainPlan,
    init_adapter: Option<&Path>,
    config: &ModelConfig,
    weights: &Weights,
    base_model: String,
) -> Result<(AdapterConfig, Adapter)> {
    let (mut adapter_config, adapter) = match (init_adapter, &plan.lora) {
        (Some(dir), _) => load_adapter(dir, config, plan.train.seed)
            .with_context(|| format!("init_adapter {}", dir.display()))?,
        (None, Some(lora)) => new_adapter(config, weights, lora)?,
        (None, None) => unreachable!("plan keeps the LoRA options without init_adapter"),
    };
    adapter_config.base_model_name_or_path = Some(base_model);
    adapter_config.inference_mode = true;
    Ok((adapter_config, adapter))
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
            ..Default::default()
        },
    )?))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Plans the run's device memory before any weight is uploaded, so that a run whose activations
/// cannot be bound fails here and not minutes into loading; checks the plan against the adapter's
/// buffer limits and `device_memory_gib`, and reserves the staging it needs. Returns the plan's
/// one-line summary.
pub fn fit_to_device(
    gpu: &Gpu,
    config: &ModelConfig,
    weights: &Weights,
    adapter: &Adapter,
    data: &StreamSource,
    p: &LoraTrainParams,
) -> Result<String> {
    let memory = memory_plan(
        config,
        weights,
        adapter,
        data,
        p,
        gpu.max_binding_bytes(),
        gpu.stages_operands(),
    )?;
    let summary = format!(
        "device memory plan: {:.1} MiB (weights {:.1}, trainable {:.1}, activations {:.1}, staging {:.1})",
        mib(memory.device_total()),
        mib(memory.device_part_total("weights")),
        mib(memory.device_part_total("trainable")),
        mib(memory.device_part_total("activations")),
        mib(memory.device_part_total("staging")),
    );
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
        .with_context(|| format!("the model does not fit the GPU adapter ({summary})"))?;
    gpu.reserve_staging(memory.staging_reserve_bytes(gpu.max_binding_bytes()));
    Ok(summary)
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
    let model_opts = Gemma3GpuOptions {
        matmul_precision: MatmulPrecision::parse(&p.matmul_precision)?,
        bf16: p.bf16,
        ..Default::default()
    };
    let (base, frozen_tables) = Gemma3Gpu::device_storage(config, weights, &model_opts)?;
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
            base,
            frozen_tables,
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

/// The plan options of a lora-train run (what `Gemma3Gpu` holds: the linears in `base` and the
/// frozen vocabulary tables in `frozen_tables`, as [`Gemma3Gpu::device_storage`] says; every
/// other tensor in f32, since the kernels compute in f32) for a LoRA setup and a micro-batch
/// shape. The `memory_plan` example plans the guide's recipes with it.
pub fn plan_options(
    base: BaseFormat,
    frozen_tables: FloatDtype,
    lora: LoraPlan,
    activations: ActivationPlan,
) -> PlanOptions {
    PlanOptions {
        base,
        base_dtype: FloatDtype::F32,
        frozen_tables,
        lora: Some(lora),
        activations: Some(activations),
    }
}

/// Creates `dir` if needed and proves a file can be created in it.
pub fn check_writable(dir: &Path) -> Result<()> {
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
