//! Reading, validating and writing an adapter folder.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use anyhow::{bail, ensure, Context};
use serde_json::Value;

use super::*;

/// A PEFT adapter folder as stored: its config and its tensors by PEFT key, each in its saved
/// dtype (the weights as the model uses them are [`crate::reference::lora::Adapter`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterFolder {
    pub config: AdapterConfig,
    /// PEFT key → tensor.
    pub tensors: BTreeMap<String, HostTensor>,
}

impl AdapterFolder {
    /// Module names with a LoRA pair, sorted.
    pub fn lora_modules(&self) -> Vec<&str> {
        self.tensors
            .keys()
            .filter_map(|k| match AdapterKey::parse(k) {
                Some(AdapterKey::LoraA(m)) => Some(m),
                _ => None,
            })
            .collect()
    }

    /// Modules saved whole (modules_to_save copies), sorted.
    pub fn saved_modules(&self) -> Vec<&str> {
        self.tensors
            .keys()
            .filter_map(|k| match AdapterKey::parse(k) {
                Some(AdapterKey::Saved(m)) => Some(m),
                _ => None,
            })
            .collect()
    }
}

/// A tensor's type and shape, without its data (from a safetensors header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// Checks that the tensors are what PEFT would save for this config: PEFT key names, an A and a
/// B for every LoRA module with ranks agreeing with `r`/`rank_pattern`, modules matched by
/// `target_modules`, saved modules listed in `modules_to_save`. Errors name the tensor.
pub fn validate(
    config: &AdapterConfig,
    tensors: &BTreeMap<String, HostTensor>,
) -> anyhow::Result<()> {
    for (key, t) in tensors {
        ensure!(
            t.bytes.len() == t.numel() * t.dtype.size(),
            "adapter tensor `{key}`: {} bytes for shape {:?} of {:?}",
            t.bytes.len(),
            t.shape,
            t.dtype
        );
    }
    let metas = tensors
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                TensorMeta {
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                },
            )
        })
        .collect();
    validate_shapes(config, &metas)
}

/// [`validate`] on types and shapes only.
pub fn validate_shapes(
    config: &AdapterConfig,
    tensors: &BTreeMap<String, TensorMeta>,
) -> anyhow::Result<()> {
    ensure!(config.r > 0, "LoRA rank r must be positive");
    ensure!(
        config.bias == "none",
        "bias = {:?} is not supported (the runner trains no biases)",
        config.bias
    );
    ensure!(
        !config.use_dora,
        "DoRA adapters (use_dora = true) are not supported"
    );
    ensure!(!tensors.is_empty(), "the adapter has no tensors");
    for (key, t) in tensors {
        match AdapterKey::parse(key) {
            None => bail!(
                "adapter tensor `{key}` is not a PEFT key (expected `{KEY_PREFIX}<module>.lora_A.weight`, `.lora_B.weight` or a modules_to_save `<module>.weight`)"
            ),
            Some(AdapterKey::Saved(m)) => ensure!(
                config.saves_module(m),
                "adapter tensor `{key}`: module `{m}` is not in modules_to_save {:?}",
                config.modules_to_save.as_deref().unwrap_or(&[])
            ),
            Some(AdapterKey::LoraA(m)) => {
                let b = tensors
                    .get(&lora_b_key(m))
                    .with_context(|| format!("adapter tensor `{key}` has no matching `{}`", lora_b_key(m)))?;
                let r = config.rank_for(m) as usize;
                ensure!(
                    t.shape.len() == 2 && t.shape[0] == r,
                    "adapter tensor `{key}` has shape {:?}, expected [{r}, in_features]",
                    t.shape
                );
                ensure!(
                    b.shape.len() == 2 && b.shape[1] == r,
                    "adapter tensor `{}` has shape {:?}, expected [out_features, {r}]",
                    lora_b_key(m),
                    b.shape
                );
                ensure!(
                    config.targets(m)?,
                    "adapter tensor `{key}`: module `{m}` is not matched by target_modules {:?}",
                    config.target_modules
                );
            }
            Some(AdapterKey::LoraB(m)) => ensure!(
                tensors.contains_key(&lora_a_key(m)),
                "adapter tensor `{key}` has no matching `{}`",
                lora_a_key(m)
            ),
        }
    }
    Ok(())
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (created if needed),
/// each through a temporary file renamed into place. The tensors are validated first.
pub fn write_adapter(
    dir: &Path,
    config: &AdapterConfig,
    tensors: &BTreeMap<String, HostTensor>,
) -> anyhow::Result<()> {
    validate(config, tensors)?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(tensors.iter(), Some(metadata))
        .context("serializing the adapter tensors")?;
    op_api::atomic_file::write(&dir.join(WEIGHTS_FILE), &bytes)?;
    op_api::atomic_file::write(&dir.join(CONFIG_FILE), config.to_json_string().as_bytes())?;
    Ok(())
}

/// Reads a PEFT LoRA adapter folder (written by PEFT or by [`write_adapter`]).
pub fn read_adapter(dir: &Path) -> anyhow::Result<AdapterFolder> {
    let config = read_config(dir)?;
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.exists() && dir.join("adapter_model.bin").exists() {
        bail!(
            "{}: only adapter_model.safetensors is supported, not the pickle adapter_model.bin",
            dir.display()
        );
    }
    let bytes =
        fs::read(&weights_path).with_context(|| format!("reading {}", weights_path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("parsing {}", weights_path.display()))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        let dtype = DType::from_safetensors(view.dtype())
            .filter(|d| d.is_float())
            .with_context(|| {
                format!(
                    "{}: tensor `{name}` has dtype {:?}; expected F32, BF16 or F16",
                    weights_path.display(),
                    view.dtype()
                )
            })?;
        tensors.insert(
            name,
            HostTensor {
                dtype,
                shape: view.shape().to_vec(),
                bytes: view.data().to_vec(),
            },
        );
    }
    validate(&config, &tensors).with_context(|| format!("in {}", dir.display()))?;
    Ok(AdapterFolder { config, tensors })
}

/// Reads `adapter_config.json` of an adapter folder.
pub fn read_config(dir: &Path) -> anyhow::Result<AdapterConfig> {
    let config_path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&config_path).with_context(|| {
        format!(
            "reading {} (is {} a PEFT adapter folder?)",
            config_path.display(),
            dir.display()
        )
    })?;
    let json: Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", config_path.display()))?;
    AdapterConfig::from_json(&json).with_context(|| format!("in {}", config_path.display()))
}

/// The config and the tensors' types and shapes, validated, reading only the safetensors header
/// (an adapter with modules_to_save of a 262k vocabulary is gigabytes).
pub fn inspect_adapter(
    dir: &Path,
) -> anyhow::Result<(AdapterConfig, BTreeMap<String, TensorMeta>)> {
    use std::io::Read;
    let config = read_config(dir)?;
    let path = dir.join(WEIGHTS_FILE);
    let mut f = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let n = u64::from_le_bytes(len);
    ensure!(
        n < 100 << 20,
        "{}: safetensors header of {n} bytes is implausible",
        path.display()
    );
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .with_context(|| format!("{}: truncated safetensors header", path.display()))?;
    let v: Value = serde_json::from_slice(&header)
        .with_context(|| format!("{}: bad safetensors header", path.display()))?;
    let mut metas = BTreeMap::new();
    for (name, info) in v
        .as_object()
        .context("safetensors header is not an object")?
    {
        if name == "__metadata__" {
            continue;
        }
        let dtype = match info["dtype"].as_str() {
            Some("F32") => DType::F32,
            Some("BF16") => DType::BF16,
            Some("F16") => DType::F16,
            other => bail!(
                "{}: tensor `{name}` has dtype {other:?}; expected F32, BF16 or F16",
                path.display()
            ),
        };
        let shape = info["shape"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .with_context(|| format!("{}: tensor `{name}` has no shape", path.display()))?;
        metas.insert(name.clone(), TensorMeta { dtype, shape });
    }
    validate_shapes(&config, &metas).with_context(|| format!("in {}", dir.display()))?;
    Ok((config, metas))
}
