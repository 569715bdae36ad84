//! The GPU commands of the CLI (`--adapter`, `runner gpu`, `runner gpu --tune`) over the engine;
//! `runner-core` reaches them through [`GpuCommands`].

use anyhow::{Context, Result};
use ops::gpu::Gpu;
use runner_core::cli::{GpuCommands, TuneRequest};

/// The guide's model config (Gemma 3 4B-it), which `runner gpu --tune` tunes by default.
const GUIDE_MODEL_CONFIG: &str = include_str!("../../recipes/configs/gemma-3-4b-it.config.json");

/// The wgpu engine of the `engine` crate.
pub struct Engine;

impl GpuCommands for Engine {
    fn select_adapter(&self, spec: &str) -> Result<()> {
        ops::gpu::select_adapter(spec)
    }

    fn describe(&self) -> Result<String> {
        ops::gpu::describe()
    }

    fn tune(&self, request: &TuneRequest) -> Result<String> {
        tune(request)
    }
}

/// `runner gpu --tune`: tunes the products of a model's training step; returns the table.
fn tune(args: &TuneRequest) -> Result<String> {
    let json = match &args.config {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the model config {}", path.display()))?,
        None => GUIDE_MODEL_CONFIG.to_string(),
    };
    let config = ops::model::ModelConfig::from_json(&json).with_context(|| {
        format!(
            "{} is not a model config.json (a Gemma 3 one)",
            args.config
                .as_ref()
                .map_or("the default config".into(), |p| p.display().to_string())
        )
    })?;
    anyhow::ensure!(args.tokens > 0, "--tokens must be at least 1");
    let gpu = Gpu::get()?;
    // cooperative matrices are used only once checked here, on this adapter and driver
    for (cfg, result) in gpu.verify_coop_matmul() {
        match result {
            Ok(err) => eprintln!("cooperative matrices {cfg}: match the reference (largest relative error {err:.1e}); selected"),
            Err(e) => eprintln!("cooperative matrices {cfg}: NOT selected: {e:#}"),
        }
    }
    let mut table = format!(
        "adapter: {}\n\n| product | M×N×K | kept tiling | ms | default ms | speed-up |\n| --- | --- | --- | --- | --- | --- |\n",
        gpu.adapter_info().name
    );
    use ops::model::products::{model_products, BaseWeights};
    let base = match (args.nf4, args.bf16_weights) {
        (true, _) => BaseWeights::Nf4,
        (false, true) => BaseWeights::Bf16,
        (false, false) => BaseWeights::F32,
    };
    for shape in model_products(&config, args.tokens, base) {
        eprintln!(
            "tuning {} ({}x{}x{})",
            shape.label, shape.m, shape.n, shape.k
        );
        let (_, entry) = gpu.tune_matmul(&shape)?;
        let best = entry
            .times
            .iter()
            .find(|t| t.0 == entry.tiling)
            .map_or(0.0, |t| t.1);
        let default = entry.times.first().map_or(0.0, |t| t.1);
        table.push_str(&format!(
            "| {} | {}×{}×{} | {} | {:.3} | {:.3} | {:.2}× |\n",
            shape.label,
            shape.m,
            shape.n,
            shape.k,
            entry.tiling,
            best * 1e3,
            default * 1e3,
            default / best.max(1e-12)
        ));
    }
    match gpu.tune_file() {
        Some(f) => table.push_str(&format!("\nkept in {}\n", f.display())),
        None => table.push_str("\nnot kept: no tuning folder (set RUNNER_TUNE_DIR or HOME)\n"),
    }
    Ok(table)
}
