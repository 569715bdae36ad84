//! The Gemma 3 model: config, checkpoint weights, the NF4 checkpoint format and the device
//! memory plan. (The GPU forward/backward passes live beside these.)

pub mod bnb;
pub mod config;
pub mod gpu;
pub mod memory;
pub mod names;
pub mod peft;
pub mod products;
pub mod quantize;
pub mod reference;
pub mod safetensors_io;
pub mod train_model;
pub mod weights;

pub use config::{
    FloatDtype, Gemma3Config, Gemma3TextConfig, LayerType, ModelConfig, Rope, SiglipVisionConfig,
};
pub use weights::{Nf4Absmax, Nf4Tensor, TensorRef, Weights};

/// The model folder of a `model` or `quantized-model` artifact: `root` from its `model.json`,
/// a relative root resolved against the artifact directory (a `quantized-model` writes `"."`,
/// since the runner moves the directory into the cache after the op returns).
pub fn artifact_model_root(
    artifact_dir: &std::path::Path,
) -> anyhow::Result<(std::path::PathBuf, serde_json::Value)> {
    use anyhow::Context;
    let path = artifact_dir.join("model.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let manifest: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let root = manifest
        .get("root")
        .and_then(|r| r.as_str())
        .with_context(|| format!("{}: no `root` folder", path.display()))?;
    let root = op_api::artifact::resolve_root(artifact_dir, std::path::Path::new(root));
    Ok((root, manifest))
}
